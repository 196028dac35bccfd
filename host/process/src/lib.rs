//! Child processes tied to this process's life: when it ends — a clean exit, a panic, or a SIGKILL that
//! runs no destructor — the kernel sends its tied children SIGTERM. `computepool up` starts anvil and its
//! workers this way, so killing `up` outright no longer leaves a chain and a pipeline running; tests that
//! start anvil or workers get the same guarantee if the test binary dies.
//!
//! Owns only process creation; it never waits for, signals or reads from the children it starts (the
//! caller keeps the [`Child`] and does all that).
//!
//! How (Linux): the child asks for `PR_SET_PDEATHSIG` between fork and exec. The kernel sends that signal
//! when the *thread* that forked the child exits, not the process, so a child forked from a tokio blocking
//! thread (reaped after 10 s idle) would be killed long before its parent ends. Every tied child is
//! therefore forked by one spawner thread that lives as long as the process. A parent that died between
//! the fork and the `prctl` is caught by comparing `getppid()` with the pid it had before the fork.
//! Elsewhere [`spawn_tied`] is a plain spawn.

use std::io;
use std::process::{Child, Command};

/// The signal tied children get when this process ends. SIGTERM rather than SIGKILL: workers and anvil
/// shut down cleanly on it (a worker frees its caches and closes its links).
#[cfg(target_os = "linux")]
const DEATH_SIGNAL: libc::c_int = libc::SIGTERM;

/// Starts `command` as a child that receives SIGTERM when this process ends, however it ends.
pub fn spawn_tied(command: Command) -> io::Result<Child> {
    imp::spawn_tied(command)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};
    use std::sync::mpsc;
    use std::sync::{Mutex, OnceLock};

    use super::DEATH_SIGNAL;

    type Job = (Command, mpsc::Sender<io::Result<Child>>);

    /// The spawner thread's queue. The thread is started on first use and never exits.
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();

    pub fn spawn_tied(command: Command) -> io::Result<Child> {
        let spawner = SPAWNER.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("tied-children".into())
                .spawn(move || {
                    // Holding `tx` in the static keeps `recv` from ever failing: this thread runs until
                    // the process ends, which is what makes it a valid anchor for PR_SET_PDEATHSIG.
                    while let Ok((command, reply)) = rx.recv() {
                        let _ = reply.send(fork_tied(command));
                    }
                })
                .expect("starting the tied-children spawner thread");
            Mutex::new(tx)
        });
        let (reply_tx, reply_rx) = mpsc::channel();
        spawner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .send((command, reply_tx))
            .map_err(|_| io::Error::other("the tied-children spawner thread is gone"))?;
        reply_rx.recv().map_err(|_| io::Error::other("the tied-children spawner thread is gone"))?
    }

    fn fork_tied(mut command: Command) -> io::Result<Child> {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
        // functions (prctl, getppid, raise), allocating nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, DEATH_SIGNAL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between the fork and the prctl: then nobody will signal us.
                if libc::getppid() != parent {
                    libc::raise(DEATH_SIGNAL);
                }
                Ok(())
            });
        }
        command.spawn()
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;
    use std::process::{Child, Command};

    pub fn spawn_tied(mut command: Command) -> io::Result<Child> {
        command.spawn()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::spawn_tied;

    /// The env var that turns a test run into the middle process of the test below.
    const MIDDLE: &str = "COMPUTEPOOL_PROCESS_TEST_MIDDLE";

    /// A process is gone once /proc has no entry for it or it is a zombie waiting to be reaped.
    fn alive(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    fn sleeper() -> Command {
        let mut command = Command::new("sleep");
        command.arg("600").stdin(Stdio::null()).stdout(Stdio::null());
        command
    }

    /// Run as the middle process: start a tied `sleep` from a thread that then exits (so only the
    /// spawner thread anchors it), print its pid, and wait to be killed.
    #[test]
    #[ignore = "a role: the test below runs it in a process of its own"]
    fn middle_process_role() {
        assert!(std::env::var_os(MIDDLE).is_some(), "run only by the test below");
        let child = std::thread::spawn(|| spawn_tied(sleeper()).expect("spawning sleep")).join().expect("thread");
        println!("\ntied-child-pid={}", child.id());
        std::thread::sleep(Duration::from_secs(600));
    }

    #[test]
    fn a_tied_child_outlives_the_thread_that_started_it_and_dies_with_a_killed_parent() {
        let exe = std::env::current_exe().expect("test binary");
        let mut middle = Command::new(exe)
            .args(["--exact", "tests::middle_process_role", "--ignored", "--nocapture", "--test-threads", "1"])
            .env(MIDDLE, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the middle process");
        let stdout = middle.stdout.take().expect("piped");
        let pid: u32 = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.split("tied-child-pid=").nth(1).and_then(|pid| pid.trim().parse().ok()))
            .expect("the middle process printed its child's pid");
        // The thread that asked for the child has exited; the child must still run.
        std::thread::sleep(Duration::from_millis(300));
        assert!(alive(pid), "the tied child died with the thread that started it, not with its parent");

        // SIGKILL: no destructor, no signal handler runs in the middle process.
        middle.kill().expect("SIGKILL the middle process");
        middle.wait().expect("reap the middle process");
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let survived = alive(pid);
        if survived {
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        assert!(!survived, "the tied child {pid} outlived its SIGKILLed parent");
    }

    #[test]
    fn spawn_errors_reach_the_caller() {
        let err = spawn_tied(Command::new("/nonexistent/computepool-no-such-binary")).expect_err("no such binary");
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
