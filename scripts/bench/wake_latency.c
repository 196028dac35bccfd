/* What waking a sleeping thread costs on this machine, for the pipeline section of docs/BENCHMARKS.md.
 *
 *   wake_latency [--samples 1000] [--gap-us 5000]
 *
 * A pipeline hop is a chain of wake-ups: a compute thread hands a frame to its network thread, a
 * datagram wakes the next worker's network thread, which hands the step to that worker's compute thread.
 * Here one thread (the waker, on CPU 0) sleeps --gap-us between wakes, as a worker waits for its
 * neighbour, then writes the time into a pipe; the waiter, blocked in read(), records how long after the
 * write it ran. Three placements of the waiter:
 *   same-cpu    on the waker's CPU (the scheduler's usual choice for a wake from an otherwise idle CPU)
 *   other-idle  on CPU 1 with nothing else there: its CPU is idle when the wake comes (on a VM, a
 *               halted vCPU that the host must schedule again)
 *   other-busy  on CPU 1 while a spinning thread keeps that CPU busy (as a polling worker does)
 * Each case prints one JSON object on stdout: percentiles of the latency in µs. Needs 2 CPUs.
 * Build: cc -O2 -pthread -o wake_latency wake_latency.c
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) {
        perror("sched_setaffinity");
        exit(1);
    }
}

struct waiter {
    int fd;
    int cpu;
    int samples;
    double *latency;
};

static void *waiter_main(void *arg) {
    struct waiter *w = arg;
    pin(w->cpu);
    double sent;
    int n = 0;
    while (n < w->samples && read(w->fd, &sent, sizeof sent) == sizeof sent) w->latency[n++] = now_us() - sent;
    w->samples = n;
    return NULL;
}

static atomic_int spin_stop;

static void *spinner_main(void *arg) {
    pin(*(int *)arg);
    while (!atomic_load_explicit(&spin_stop, memory_order_relaxed)) __builtin_ia32_pause();
    return NULL;
}

static void run_case(const char *name, int waiter_cpu, int busy, int samples, int gap_us) {
    int fds[2];
    if (pipe(fds) != 0) {
        perror("pipe");
        exit(1);
    }
    pthread_t spinner, waiter;
    int spin_cpu = waiter_cpu;
    atomic_store(&spin_stop, 0);
    if (busy) pthread_create(&spinner, NULL, spinner_main, &spin_cpu);
    struct waiter w = {fds[0], waiter_cpu, samples, calloc(samples, sizeof(double))};
    pthread_create(&waiter, NULL, waiter_main, &w);
    pin(0);
    usleep(50000);
    for (int i = 0; i < samples; i++) {
        usleep(gap_us);
        double t = now_us();
        if (write(fds[1], &t, sizeof t) != sizeof t) {
            perror("write");
            exit(1);
        }
    }
    close(fds[1]);
    pthread_join(waiter, NULL);
    if (busy) {
        atomic_store(&spin_stop, 1);
        pthread_join(spinner, NULL);
    }
    close(fds[0]);
    int n = w.samples;
    qsort(w.latency, n, sizeof(double), cmp);
    printf("{\"case\": \"%s\", \"samples\": %d, \"gap_us\": %d, \"p10_us\": %.1f, \"p50_us\": %.1f, "
           "\"p90_us\": %.1f, \"p99_us\": %.1f}\n",
           name, n, gap_us, w.latency[n / 10], w.latency[n / 2], w.latency[n * 9 / 10], w.latency[n * 99 / 100]);
    fflush(stdout);
    free(w.latency);
}

int main(int argc, char **argv) {
    int samples = 1000, gap_us = 5000;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--samples")) samples = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--gap-us")) gap_us = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (samples < 10 || gap_us < 0) {
        fprintf(stderr, "--samples must be at least 10 and --gap-us not negative\n");
        return 2;
    }
    if (sysconf(_SC_NPROCESSORS_ONLN) < 2) {
        fprintf(stderr, "needs 2 CPUs\n");
        return 1;
    }
    run_case("same-cpu", 0, 0, samples, gap_us);
    run_case("other-idle", 1, 0, samples, gap_us);
    run_case("other-busy", 1, 1, samples, gap_us);
    return 0;
}
