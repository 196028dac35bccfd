/* STREAM-style memory bandwidth probe for the roofline in docs/BENCHMARKS.md.
 *
 *   bandwidth [--mib 1024] [--passes 7] [--threads 1,2]
 *
 * Three arrays of --mib MiB each (doubles), first-touched by the threads that use them.
 * Kernels, counted the way STREAM counts them (write-allocate traffic not included):
 *   read   s += a[i]              1 array  read
 *   copy   c[i] = a[i]            2 arrays (1 read + 1 write)
 *   triad  a[i] = b[i] + q*c[i]   3 arrays (2 read + 1 write)
 * For each thread count and kernel: --passes timed passes after one untimed pass; the median,
 * best and worst GB/s (1e9 bytes/s) are printed as one JSON object on stdout.
 * Build: cc -O3 -march=native -fopenmp -o bandwidth bandwidth.c
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

static double median(double *v, int n) {
    qsort(v, n, sizeof(double), cmp);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static volatile double sink;

int main(int argc, char **argv) {
    size_t mib = 1024;
    int passes = 7;
    int threads[8] = {1, 2};
    int n_threads = 2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mib") && i + 1 < argc) mib = strtoull(argv[++i], 0, 10);
        else if (!strcmp(argv[i], "--passes") && i + 1 < argc) passes = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            n_threads = 0;
            for (char *t = strtok(argv[++i], ","); t && n_threads < 8; t = strtok(0, ",")) threads[n_threads++] = atoi(t);
        } else {
            fprintf(stderr, "usage: %s [--mib N] [--passes N] [--threads 1,2]\n", argv[0]);
            return 2;
        }
    }
    if (passes < 1 || passes > 1000 || mib < 1 || n_threads < 1) return 2;
    size_t n = mib * 1024 * 1024 / sizeof(double);
    double *a = aligned_alloc(64, n * sizeof(double));
    double *b = aligned_alloc(64, n * sizeof(double));
    double *c = aligned_alloc(64, n * sizeof(double));
    if (!a || !b || !c) { fprintf(stderr, "out of memory\n"); return 1; }
    const char *names[3] = {"read", "copy", "triad"};
    const double arrays[3] = {1, 2, 3};
    double *res = malloc(sizeof(double) * passes);

    printf("{\n  \"tool\": \"stream-like\",\n  \"array_mib\": %zu,\n  \"passes\": %d,\n  \"unit\": \"GB/s (1e9 bytes/s)\",\n  \"results\": [", mib, passes);
    int first = 1;
    for (int ti = 0; ti < n_threads; ti++) {
        int nt = threads[ti];
        omp_set_num_threads(nt);
        /* first touch by the same static schedule the kernels use */
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) { a[i] = 1.0; b[i] = 2.0; c[i] = 0.5; }
        for (int k = 0; k < 3; k++) {
            for (int p = -1; p < passes; p++) {
                double t0 = omp_get_wtime();
                if (k == 0) {
                    double s = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : s)
                    for (size_t i = 0; i < n; i++) s += a[i];
                    sink = s;
                } else if (k == 1) {
#pragma omp parallel for simd schedule(static)
                    for (size_t i = 0; i < n; i++) c[i] = a[i];
                } else {
                    const double q = 3.0;
#pragma omp parallel for simd schedule(static)
                    for (size_t i = 0; i < n; i++) a[i] = b[i] + q * c[i];
                }
                double dt = omp_get_wtime() - t0;
                if (p >= 0) res[p] = arrays[k] * n * sizeof(double) / dt / 1e9;
            }
            double best = 0, worst = 1e300;
            for (int p = 0; p < passes; p++) { if (res[p] > best) best = res[p]; if (res[p] < worst) worst = res[p]; }
            double med = median(res, passes);
            printf("%s\n    {\"kernel\": \"%s\", \"threads\": %d, \"bytes_per_pass\": %.0f, \"median_gbs\": %.2f, \"best_gbs\": %.2f, \"worst_gbs\": %.2f}",
                   first ? "" : ",", names[k], nt, arrays[k] * n * sizeof(double), med, best, worst);
            first = 0;
            fflush(stdout);
        }
    }
    printf("\n  ]\n}\n");
    free(a); free(b); free(c); free(res);
    return 0;
}
