//! The standard `process_*` metrics (the names Prometheus' client libraries use, which stock
//! dashboards and alerts look for) and `<prefix>_build_info`, read from `/proc` at each scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Linux's USER_HZ (fixed at 100 on every architecture Linux supports today).
const TICKS_PER_SECOND: f64 = 100.0;
const PAGE_SIZE: f64 = 4096.0;

/// A process's figures, as `/proc` gives them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub resident_bytes: f64,
    pub virtual_bytes: f64,
    pub start_time_seconds: f64,
    pub threads: f64,
    pub open_fds: f64,
    pub max_fds: f64,
}

impl Sample {
    /// From the texts of `/proc/self/stat`, `/proc/stat` (boot time), `/proc/self/limits` and
    /// the count of `/proc/self/fd`.
    pub fn parse(stat: &str, proc_stat: &str, limits: &str, open_fds: usize) -> Self {
        // Fields after the command name (which may hold spaces and parentheses).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| -> f64 {
            // `n` is the field number proc(5) gives (1-based; the state is field 3).
            fields
                .get(n - 3)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let boot = proc_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        let max_fds = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        Self {
            cpu_seconds: (field(14) + field(15)) / TICKS_PER_SECOND,
            threads: field(20),
            start_time_seconds: boot + field(22) / TICKS_PER_SECOND,
            virtual_bytes: field(23),
            resident_bytes: field(24) * PAGE_SIZE,
            open_fds: open_fds as f64,
            max_fds,
        }
    }

    /// This process, now.
    pub fn now() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        Self::parse(
            &read("/proc/self/stat"),
            &read("/proc/stat"),
            &read("/proc/self/limits"),
            fds,
        )
    }
}

/// Collects [`Sample::now`] at each scrape.
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = Sample::now();
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                s.virtual_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                s.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                s.max_fds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                s.threads,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// Registers the `process_*` metrics on `root` (which must have no prefix: the names are
/// standard) and `<prefix>_build_info{version, component} 1`.
pub fn register(root: &mut Registry, prefix: &str, component: &str) {
    root.register_collector(Box::new(ProcessCollector));
    let info = Family::<Vec<(String, String)>, Gauge>::default();
    info.get_or_create(&vec![
        ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("component".to_string(), component.to_string()),
    ])
    .set(1);
    root.register(
        format!("{prefix}_build_info"),
        "The build: its version and which Strait component it is (always 1)",
        info,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_as_proc5_numbers_its_fields() {
        // A command name with spaces and a parenthesis, as /proc shows it.
        let stat = "4242 (strait (x) y) S 1 4242 4242 0 -1 4194560 600 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 2048 18446744073709551615";
        let s = Sample::parse(
            stat,
            "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n",
            "Limit Soft Limit Hard Limit Units\nMax open files            1048576              1048576              files\n",
            12,
        );
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7.0);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.virtual_bytes, 123_456_789.0);
        assert_eq!(s.resident_bytes, 2048.0 * 4096.0);
        assert_eq!(s.open_fds, 12.0);
        assert_eq!(s.max_fds, 1_048_576.0);
        assert_eq!(Sample::parse("", "", "", 0), Sample::default());
    }

    #[test]
    fn registers_the_standard_names() {
        let mut root = Registry::default();
        register(&mut root, "strait", "proxy");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &root).expect("encode");
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_start_time_seconds ",
            "process_open_fds ",
            "process_max_fds ",
            "strait_build_info{version=\"",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
        assert!(Sample::now().start_time_seconds > 1.6e9);
    }
}
