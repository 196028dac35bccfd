//! The process's resident memory, to compare a worker's footprint with its share of the model.

/// Resident set size in bytes (Linux: `VmRSS` of `/proc/self/status`), `None` where it cannot be read.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_running_process_has_resident_memory() {
        let rss = super::resident_bytes().expect("Linux reports VmRSS");
        assert!(rss > 1 << 20, "{rss} bytes");
    }
}
