//! Capture rules in a real kernel. Every test makes network namespaces of
//! its own and runs the real `iptables` tools only inside them, so the
//! machine's own rules are never touched. Needs root; skipped otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::Duration;

use meshward_capture::plan::TABLES;
use meshward_capture::testing::{Netns, Transcript, accept_any, original_dst, root_or_skip};
use meshward_capture::{
    CaptureConfig, Family, Plan, Ports, Runner, install, plan, show, uninstall,
};

/// A connection: from which namespace, marked as the proxy's or not, from
/// which source address, to where; which listener gets it, and whether it
/// was redirected there.
type Case<'a> = (&'a Netns, bool, Option<&'a str>, SocketAddr, &'a str, bool);

const SAVE: [(Family, &str); 2] = [
    (Family::V4, "iptables-save"),
    (Family::V6, "ip6tables-save"),
];

fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// Most options at once: DNS capture (raw table too), a mark, exclusions.
fn busy_config() -> CaptureConfig {
    CaptureConfig {
        capture_dns: true,
        dns_servers: vec![
            "198.18.0.53".parse().unwrap(),
            "2001:2::53".parse().unwrap(),
        ],
        proxy_mark: Some(0x539),
        exclude_inbound_ports: vec![22],
        exclude_outbound_ports: vec![5432],
        exclude_outbound_ip_ranges: nets(&["198.18.5.0/24", "2001:2:0:5::/64"]),
        ..CaptureConfig::default()
    }
}

/// The lines of one table of `iptables-save` output.
fn table<'a>(saved: &'a str, name: &str) -> Vec<&'a str> {
    let header = format!("*{name}");
    saved
        .lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| *l != "COMMIT")
        .collect()
}

/// The rules in force in `ns` are `plan`'s: per family and table, the same
/// meshward chains and as many meshward rules (iptables-save spells rules
/// its own way, `-p tcp -m tcp --dport`, so they are counted, not
/// compared), and no meshward line in a family the plan leaves out.
fn assert_in_force(ns: &Netns, plan: &Plan) {
    for (family, save) in SAVE {
        let saved = ns.rules(save);
        let planned = plan.rulesets().find(|r| r.family == family);
        for name in TABLES {
            let lines = table(&saved, name);
            let mut chains: Vec<&str> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(':'))
                .filter_map(|l| l.split(' ').next())
                .filter(|c| c.starts_with("MESHWARD_"))
                .collect();
            chains.sort_unstable();
            let rules = lines
                .iter()
                .filter(|l| l.starts_with("-A ") && l.contains("MESHWARD_"))
                .count();
            let (mut want_chains, want_rules) = match planned.and_then(|p| p.table(name)) {
                Some(t) => (t.chains.clone(), t.rules.len()),
                None => (Vec::new(), 0),
            };
            want_chains.sort_unstable();
            assert_eq!(chains, want_chains, "{family:?} {name} chains:\n{saved}");
            assert_eq!(rules, want_rules, "{family:?} {name} rules:\n{saved}");
        }
    }
}

fn all_rules(ns: &Netns) -> [String; 2] {
    SAVE.map(|(_, save)| ns.rules(save))
}

#[test]
fn install_twice_equals_once_and_uninstall_restores_exactly_what_was_there() {
    if !root_or_skip() {
        return;
    }
    let ns = Netns::new();
    let runner = ns.runner();
    // A user's own chain, and rules in the chains meshward jumps from.
    for tool in ["iptables", "ip6tables"] {
        for args in [
            &["-t", "nat", "-N", "USER_CHAIN"][..],
            &[
                "-t",
                "nat",
                "-A",
                "USER_CHAIN",
                "-p",
                "tcp",
                "--dport",
                "7",
                "-j",
                "RETURN",
            ],
            &["-t", "nat", "-A", "OUTPUT", "-j", "USER_CHAIN"],
            &["-t", "nat", "-A", "PREROUTING", "-p", "udp", "-j", "RETURN"],
            &[
                "-t", "raw", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT",
            ],
        ] {
            ns.exec(tool, args);
        }
    }
    let before = all_rules(&ns);
    assert!(!before[0].contains("MESHWARD") && before[0].contains("USER_CHAIN"));

    let cfg = busy_config();
    install(&cfg, &runner).unwrap();
    let plan = plan(&cfg).unwrap();
    assert_in_force(&ns, &plan);
    let first = all_rules(&ns);
    for rules in &first {
        assert!(rules.contains("-A OUTPUT -j USER_CHAIN"), "{rules}");
        assert!(rules.contains("-A OUTPUT -j MESHWARD_OUTPUT"), "{rules}");
        assert!(
            rules.contains("-A PREROUTING -p tcp -j MESHWARD_INBOUND"),
            "{rules}"
        );
    }

    // `show` lists meshward's lines of both families, and only those.
    let shown = show(&runner).unwrap();
    let (v4, v6) = shown.split_once("# IPv6\n").expect("an IPv6 part");
    assert!(v4.starts_with("# IPv4\n*"), "{shown}");
    for (part, saved) in [(v4, &first[0]), (v6, &first[1])] {
        assert!(!part.contains("USER_CHAIN"), "{part}");
        let ours: Vec<&str> = saved.lines().filter(|l| l.contains("MESHWARD_")).collect();
        let shown_rules: Vec<&str> = part.lines().filter(|l| l.contains("MESHWARD_")).collect();
        assert_eq!(shown_rules, ours);
        assert!(part.contains("*raw\n:MESHWARD_INBOUND_DNS"), "{part}");
    }

    install(&cfg, &runner).unwrap();
    assert_eq!(all_rules(&ns), first, "a second install changed the rules");

    assert!(uninstall(&runner).unwrap(), "nothing was removed");
    let after = all_rules(&ns);
    assert_eq!(
        after, before,
        "uninstall left something, or removed the user's rules"
    );
    assert!(after.iter().all(|rules| !rules.contains("MESHWARD")));
    assert_eq!(show(&runner).unwrap(), "");

    assert!(!uninstall(&runner).unwrap(), "removed something twice");
    assert_eq!(all_rules(&ns), before);
}

#[test]
fn uninstall_with_nothing_installed_succeeds_and_changes_nothing() {
    if !root_or_skip() {
        return;
    }
    let ns = Netns::new();
    let before = all_rules(&ns);
    assert!(!uninstall(&ns.runner()).unwrap());
    assert_eq!(all_rules(&ns), before);
    assert_eq!(show(&ns.runner()).unwrap(), "");
}

/// Every kind of option is accepted by the real iptables-restore, and each
/// install replaces the previous one whatever it was (chains no longer
/// planned, such as the DNS ones, go).
#[test]
fn each_option_set_is_accepted_and_replaces_the_previous_one() {
    if !root_or_skip() {
        return;
    }
    let ns = Netns::new();
    let runner = ns.runner();
    let configs = [
        CaptureConfig::default(),
        busy_config(),
        CaptureConfig {
            proxy_uids: vec![3, 4],
            proxy_gids: vec![1],
            ..CaptureConfig::default()
        },
        CaptureConfig {
            proxy_uids: vec![],
            proxy_gids: vec![],
            proxy_mark: Some(7),
            include_inbound_ports: Ports::List(vec![9080, 8080]),
            ..CaptureConfig::default()
        },
        CaptureConfig {
            include_inbound_ports: Ports::none(),
            include_outbound_ip_ranges: nets(&["127.0.0.0/8", "198.18.0.0/15", "2001:2::/48"]),
            exclude_outbound_ip_ranges: nets(&["198.18.1.0/24"]),
            ..CaptureConfig::default()
        },
        CaptureConfig {
            capture_dns: true,
            dns_servers: vec!["127.0.0.53".parse().unwrap()],
            outbound_port: 16001,
            inbound_port: 16006,
            dns_port: 16053,
            admin_port: 16000,
            ..CaptureConfig::default()
        },
        // IPv6 off: meshward's IPv6 rules are removed.
        CaptureConfig {
            ipv6: false,
            ..busy_config()
        },
        busy_config(),
    ];
    for cfg in &configs {
        install(cfg, &runner).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
        assert_in_force(&ns, &plan(cfg).unwrap());
    }
    uninstall(&runner).unwrap();
    assert!(
        all_rules(&ns)
            .iter()
            .all(|rules| !rules.contains("MESHWARD"))
    );
}

#[test]
fn a_dry_run_prints_the_changes_and_makes_none() {
    if !root_or_skip() {
        return;
    }
    let ns = Netns::new();
    let before = all_rules(&ns);
    let transcript = Transcript::default();
    let dry = Runner::dry_run(transcript.clone()).in_netns(ns.name());
    let cfg = busy_config();

    install(&cfg, &dry).unwrap();
    assert_eq!(all_rules(&ns), before, "a dry run changed the rules");
    let plan = plan(&cfg).unwrap();
    let printed = transcript.text();
    let netns = format!("ip netns exec {} ", ns.name());
    assert!(printed.contains(&format!("{netns}ip -6 addr replace ::6/128 dev lo\n")));
    // Nothing is installed, so each family's input is exactly the plan.
    for rules in plan.rulesets() {
        let call = format!(
            "{netns}{} --noflush <<'EOF'\n{rules}EOF\n",
            rules.family.restore()
        );
        assert!(printed.contains(&call), "missing:\n{call}\nin:\n{printed}");
    }

    // Installed for real, a dry uninstall prints the removal only.
    install(&cfg, &ns.runner()).unwrap();
    let installed = all_rules(&ns);
    let transcript = Transcript::default();
    uninstall(&Runner::dry_run(transcript.clone()).in_netns(ns.name())).unwrap();
    assert_eq!(all_rules(&ns), installed, "a dry run changed the rules");
    let printed = transcript.text();
    assert!(
        printed.contains("-D OUTPUT -j MESHWARD_OUTPUT\n"),
        "{printed}"
    );
    assert!(printed.contains("-X MESHWARD_OUTPUT\n"), "{printed}");
    assert!(printed.contains("-X MESHWARD_INBOUND_DNS\n"), "{printed}");
}

/// Real connections through the installed rules, IPv4 and IPv6, between a
/// client namespace and a workload namespace joined by a veth pair. The
/// workload namespace has listeners on the proxy's ports and the
/// application's; the test's own sockets play application (root, no
/// mark) and proxy (marked 0x539).
#[test]
fn connections_reach_the_proxy_or_bypass_it_as_istio_captures_them() {
    if !root_or_skip() {
        return;
    }
    let client = Netns::new();
    let workload = Netns::new();
    client.link(
        &workload,
        &["198.18.0.1/30", "2001:2::1/64"],
        &["198.18.0.2/30", "2001:2::2/64"],
    );
    const MARK: u32 = 0x539;
    let cfg = CaptureConfig {
        proxy_mark: Some(MARK),
        exclude_inbound_ports: vec![2222],
        ..CaptureConfig::default()
    };
    install(&cfg, &workload.runner()).unwrap();

    let families: [(&str, &str, &str, &str, &str); 2] = [
        (
            "198.18.0.1",
            "198.18.0.2",
            "0.0.0.0",
            "127.0.0.1",
            "127.0.0.6",
        ),
        ("2001:2::1", "2001:2::2", "::", "::1", "::6"),
    ];
    for (client_ip, workload_ip, any, loopback, passthrough) in families {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let at = |host: &str, port: u16| SocketAddr::new(ip(host), port);
        let names = [
            "outbound",
            "inbound",
            "admin",
            "app",
            "excluded",
            "client-side server",
        ];
        let listeners: Vec<TcpListener> = [15001, 15006, 15000, 9080, 2222]
            .into_iter()
            .map(|port| workload.listen(at(any, port)))
            .chain([client.listen(at(client_ip, 7070))])
            .collect();
        let listeners: Vec<&TcpListener> = listeners.iter().collect();

        // (from namespace, marked, bound source, destination, lands on, redirected)
        let cases: [Case; 9] = [
            // Inbound to the application: captured.
            (&client, false, None, at(workload_ip, 9080), "inbound", true),
            // Inbound to the proxy's own port, or an excluded one: not.
            (&client, false, None, at(workload_ip, 15000), "admin", false),
            (
                &client,
                false,
                None,
                at(workload_ip, 2222),
                "excluded",
                false,
            ),
            // The application calling out: captured.
            (&workload, false, None, at(client_ip, 80), "outbound", true),
            // The proxy calling out: not.
            (
                &workload,
                true,
                None,
                at(client_ip, 7070),
                "client-side server",
                false,
            ),
            // The proxy calling its own workload's address over loopback:
            // inbound capture (the call gets inbound policy).
            (
                &workload,
                true,
                None,
                at(workload_ip, 9080),
                "inbound",
                true,
            ),
            // ... unless from the inbound passthrough source.
            (
                &workload,
                true,
                Some(passthrough),
                at(workload_ip, 9080),
                "app",
                false,
            ),
            // The application calling itself: not captured.
            (&workload, false, None, at(workload_ip, 9080), "app", false),
            (&workload, false, None, at(loopback, 9080), "app", false),
        ];
        for (ns, marked, source, to, expected, redirected) in cases {
            let what = format!(
                "{} {}-> {to}",
                if marked { "marked" } else { "unmarked" },
                source.map(|s| format!("from {s} ")).unwrap_or_default()
            );
            let socket = ns.socket(socket2::Domain::for_address(to));
            if marked {
                socket.set_mark(MARK).unwrap();
            }
            if let Some(source) = source {
                socket
                    .bind(&at(source, 0).into())
                    .unwrap_or_else(|e| panic!("{what}: bind: {e}"));
            }
            socket
                .connect_timeout(&to.into(), Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
            let (index, accepted) = accept_any(&listeners);
            assert_eq!(names[index], expected, "{what}");
            if redirected {
                assert_eq!(original_dst(&accepted), to, "{what}: original destination");
            }
        }
    }
    uninstall(&workload.runner()).unwrap();
}
