//! `strait-proxy init`: the iptables rules that make a pod's traffic go through its proxy.
//!
//! nat/PREROUTING -> STRAIT_INBOUND:  skip-inbound-ports RETURN, else REDIRECT to the inbound port
//! nat/OUTPUT     -> STRAIT_OUTBOUND: the proxy's UID RETURN (no loops), loopback RETURN,
//!                                    skip ports / CIDRs RETURN, else REDIRECT to the outbound port
//!
//! Applying flushes and refills Strait's own chains and adds each jump only if missing, so it is
//! idempotent; `--cleanup` removes the jumps and the chains. Other rules are never touched.

use std::net::IpAddr;
use std::process::Command;

use clap::Args;

use crate::config::PortList;

const INBOUND_CHAIN: &str = "STRAIT_INBOUND";
const OUTBOUND_CHAIN: &str = "STRAIT_OUTBOUND";

/// Settings of `strait-proxy init`.
#[derive(Debug, Clone, Args)]
pub struct InitConfig {
    /// UID the proxy runs as; its own connections are not redirected.
    #[arg(long, env = "STRAIT_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,
    #[arg(long, env = "STRAIT_INBOUND_PORT", default_value_t = 4143)]
    pub inbound_port: u16,
    #[arg(long, env = "STRAIT_OUTBOUND_PORT", default_value_t = 4140)]
    pub outbound_port: u16,
    /// Inbound ports not redirected (the admin port by default).
    #[arg(long, env = "STRAIT_SKIP_INBOUND_PORTS", default_value = "4190,4191", value_parser = PortList::parse)]
    pub skip_inbound_ports: PortList,
    /// Outbound destination ports not redirected.
    #[arg(long, env = "STRAIT_SKIP_OUTBOUND_PORTS", default_value = "", value_parser = PortList::parse)]
    pub skip_outbound_ports: PortList,
    /// Outbound destination CIDRs not redirected (comma-separated).
    #[arg(long, env = "STRAIT_SKIP_OUTBOUND_CIDRS", default_value = "", value_parser = parse_cidrs)]
    pub skip_outbound_cidrs: Cidrs,
    /// Also write ip6tables rules (when ip6tables works here).
    #[arg(long, env = "STRAIT_INIT_IPV6", default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6: bool,
    /// Remove the rules instead of writing them.
    #[arg(long)]
    pub cleanup: bool,
    /// Print the commands without running them.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs(Vec<(IpAddr, u8)>);

pub fn parse_cidrs(s: &str) -> Result<Cidrs, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = || format!("{item:?} is not a CIDR like 10.0.0.0/8 or fd00::/8");
        let (ip, len) = item.split_once('/').unwrap_or((item, ""));
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = if len.is_empty() {
            max
        } else {
            len.parse().map_err(|_| bad())?
        };
        if len > max {
            return Err(bad());
        }
        out.push((ip, len));
    }
    Ok(Cidrs(out))
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "`{command}` failed: {stderr} (init needs root or CAP_NET_ADMIN, and the iptables package)"
    )]
    Command { command: String, stderr: String },
    #[error("cannot run `{program}`: {source} (install the iptables package)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

/// One iptables invocation; `may_fail` ones are checks or best-effort removals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub args: Vec<String>,
    pub may_fail: bool,
    /// Run only if this check (`-C`) fails: how jumps are added once.
    pub unless: Option<Vec<String>>,
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The steps that install the rules for `family`.
pub fn install_plan(cfg: &InitConfig, family: Family) -> Vec<Step> {
    let mut steps = Vec::new();
    let plain = |a: Vec<String>| Step {
        args: a,
        may_fail: false,
        unless: None,
    };
    for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
        // -N fails when the chain exists; that is fine, -F then empties it.
        steps.push(Step {
            args: args(&["-t", "nat", "-N", chain]),
            may_fail: true,
            unless: None,
        });
        steps.push(plain(args(&["-t", "nat", "-F", chain])));
    }
    for port in cfg.skip_inbound_ports.ports() {
        steps.push(plain(args(&[
            "-t",
            "nat",
            "-A",
            INBOUND_CHAIN,
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "RETURN",
        ])));
    }
    steps.push(plain(args(&[
        "-t",
        "nat",
        "-A",
        INBOUND_CHAIN,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &cfg.inbound_port.to_string(),
    ])));
    let uid = cfg.proxy_uid.to_string();
    steps.push(plain(args(&[
        "-t",
        "nat",
        "-A",
        OUTBOUND_CHAIN,
        "-m",
        "owner",
        "--uid-owner",
        &uid,
        "-j",
        "RETURN",
    ])));
    steps.push(plain(args(&[
        "-t",
        "nat",
        "-A",
        OUTBOUND_CHAIN,
        "-o",
        "lo",
        "-j",
        "RETURN",
    ])));
    steps.push(plain(args(&[
        "-t",
        "nat",
        "-A",
        OUTBOUND_CHAIN,
        "-d",
        family.loopback(),
        "-j",
        "RETURN",
    ])));
    for port in cfg.skip_outbound_ports.ports() {
        steps.push(plain(args(&[
            "-t",
            "nat",
            "-A",
            OUTBOUND_CHAIN,
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "RETURN",
        ])));
    }
    for (ip, len) in &cfg.skip_outbound_cidrs.0 {
        if ip.is_ipv4() == (family == Family::V4) {
            steps.push(plain(args(&[
                "-t",
                "nat",
                "-A",
                OUTBOUND_CHAIN,
                "-d",
                &format!("{ip}/{len}"),
                "-j",
                "RETURN",
            ])));
        }
    }
    steps.push(plain(args(&[
        "-t",
        "nat",
        "-A",
        OUTBOUND_CHAIN,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &cfg.outbound_port.to_string(),
    ])));
    for (hook, chain) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)] {
        steps.push(Step {
            args: args(&["-t", "nat", "-A", hook, "-p", "tcp", "-j", chain]),
            may_fail: false,
            unless: Some(args(&["-t", "nat", "-C", hook, "-p", "tcp", "-j", chain])),
        });
    }
    steps
}

/// The steps that remove everything [`install_plan`] adds.
pub fn cleanup_plan() -> Vec<Step> {
    let mut steps = Vec::new();
    for (hook, chain) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)] {
        steps.push(Step {
            args: args(&["-t", "nat", "-D", hook, "-p", "tcp", "-j", chain]),
            may_fail: true,
            unless: None,
        });
    }
    for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
        steps.push(Step {
            args: args(&["-t", "nat", "-F", chain]),
            may_fail: true,
            unless: None,
        });
        steps.push(Step {
            args: args(&["-t", "nat", "-X", chain]),
            may_fail: true,
            unless: None,
        });
    }
    steps
}

fn run(program: &str, args: &[String]) -> Result<bool, InitError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| InitError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if out.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(InitError::Command {
        command: format!("{program} {}", args.join(" ")),
        stderr,
    })
}

fn execute(family: Family, steps: &[Step], dry_run: bool) -> Result<(), InitError> {
    let program = family.program();
    for step in steps {
        if dry_run {
            println!("{program} {}", step.args.join(" "));
            continue;
        }
        if let Some(check) = &step.unless {
            if run(program, check).is_ok() {
                continue;
            }
        }
        match run(program, &step.args) {
            Ok(_) => {}
            Err(e) if step.may_fail => tracing::debug!(error = %e, "ignored"),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn ipv6_usable() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
        && Command::new("ip6tables")
            .args(["-t", "nat", "-L", "-n"])
            .output()
            .is_ok_and(|o| o.status.success())
}

/// Runs `strait-proxy init`.
pub fn apply(cfg: &InitConfig) -> Result<(), InitError> {
    let mut families = vec![Family::V4];
    if cfg.ipv6 && (cfg.dry_run || ipv6_usable()) {
        families.push(Family::V6);
    }
    for family in families {
        let steps = if cfg.cleanup {
            cleanup_plan()
        } else {
            install_plan(cfg, family)
        };
        execute(family, &steps, cfg.dry_run)?;
    }
    if !cfg.dry_run {
        tracing::info!(cleanup = cfg.cleanup, "iptables rules applied");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        init: InitConfig,
    }

    fn cfg(extra: &[&str]) -> InitConfig {
        T::try_parse_from(std::iter::once("t").chain(extra.iter().copied()))
            .expect("valid flags")
            .init
    }

    fn lines(steps: &[Step]) -> Vec<String> {
        steps.iter().map(|s| s.args.join(" ")).collect()
    }

    #[test]
    fn the_plan_excludes_the_proxy_uid_loopback_and_skips_then_redirects() {
        let c = cfg(&[
            "--skip-outbound-ports",
            "22",
            "--skip-outbound-cidrs",
            "10.1.0.0/16,fd00::/8",
        ]);
        let v4 = lines(&install_plan(&c, Family::V4));
        let pos = |needle: &str| {
            v4.iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle} in {v4:#?}"))
        };
        assert!(pos("--uid-owner 2102 -j RETURN") < pos("REDIRECT --to-ports 4140"));
        assert!(pos("-o lo -j RETURN") < pos("REDIRECT --to-ports 4140"));
        assert!(pos("--dport 22 -j RETURN") < pos("REDIRECT --to-ports 4140"));
        assert!(pos("-d 10.1.0.0/16 -j RETURN") < pos("REDIRECT --to-ports 4140"));
        assert!(
            pos("STRAIT_INBOUND -p tcp --dport 4191 -j RETURN") < pos("REDIRECT --to-ports 4143")
        );
        assert!(
            !v4.iter().any(|l| l.contains("fd00::")),
            "v6 CIDRs only in the v6 plan"
        );
        let v6 = lines(&install_plan(&c, Family::V6));
        assert!(v6.iter().any(|l| l.contains("-d fd00::/8 -j RETURN")));
        assert!(v6.iter().any(|l| l.contains("-d ::1/128 -j RETURN")));
    }

    #[test]
    fn jumps_are_added_only_when_missing() {
        let plan = install_plan(&cfg(&[]), Family::V4);
        let jumps: Vec<_> = plan.iter().filter(|s| s.unless.is_some()).collect();
        assert_eq!(jumps.len(), 2);
        assert!(jumps.iter().all(|s| s
            .unless
            .as_ref()
            .is_some_and(|c| c.contains(&"-C".to_string()))));
        let cleanup = lines(&cleanup_plan());
        assert!(cleanup
            .iter()
            .any(|l| l == "-t nat -D OUTPUT -p tcp -j STRAIT_OUTBOUND"));
        assert!(cleanup.iter().any(|l| l == "-t nat -X STRAIT_INBOUND"));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = T::try_parse_from(["t", "--skip-outbound-cidrs", "10.0.0.0/40"])
            .err()
            .expect("bad")
            .to_string();
        assert!(
            err.contains("--skip-outbound-cidrs") && err.contains("10.0.0.0/40"),
            "{err}"
        );
        let err = T::try_parse_from(["t", "--skip-inbound-ports", "http"])
            .err()
            .expect("bad")
            .to_string();
        assert!(
            err.contains("--skip-inbound-ports") && err.contains("http"),
            "{err}"
        );
    }
}
