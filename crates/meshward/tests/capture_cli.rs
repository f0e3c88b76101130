//! `meshward capture install|show|uninstall`, the built binary run inside a
//! network namespace of the test's own (`ip netns exec`), so the machine's
//! own rules are never touched. Needs root; skipped otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use meshward_capture::testing::{Netns, root_or_skip};
use meshward_capture::{CaptureConfig, plan, show};

/// Runs `meshward ARGS` in `ns`, after `wrapper` (a program that runs the
/// rest, such as `env` or `setpriv`, with its options), if any.
fn meshward(ns: &Netns, wrapper: &[&str], args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(wrapper)
        .arg(env!("CARGO_BIN_EXE_meshward"))
        .args(args)
        .output()
        .expect("running meshward")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn all_rules(ns: &Netns) -> [String; 2] {
    ["iptables-save", "ip6tables-save"].map(|save| ns.rules(save))
}

#[test]
fn install_dry_run_prints_the_plan_and_changes_nothing() {
    if !root_or_skip() {
        return;
    }
    let ns = Netns::new();
    let before = all_rules(&ns);
    let printed = stdout(&meshward(
        &ns,
        &[],
        &[
            "capture",
            "install",
            "--dry-run",
            "--exclude-inbound-ports=22",
        ],
    ));
    assert_eq!(all_rules(&ns), before, "a dry run changed the rules");
    let cfg = CaptureConfig {
        exclude_inbound_ports: vec![22],
        ..CaptureConfig::default()
    };
    for rules in plan(&cfg).unwrap().rulesets() {
        let call = format!("{} --noflush <<'EOF'\n{rules}EOF\n", rules.family.restore());
        assert!(printed.contains(&call), "missing:\n{call}\nin:\n{printed}");
    }
}

#[test]
fn install_show_and_uninstall_from_the_command_line() {
    if !root_or_skip() {
        return;
    }
    let ns = Netns::new();
    let installed = stdout(&meshward(
        &ns,
        &[],
        &[
            "capture",
            "install",
            "--proxy-mark=0x539",
            "--exclude-inbound-ports=22",
        ],
    ));
    assert_eq!(
        installed,
        "capturing IPv4 and IPv6: inbound TCP to :15006, outbound TCP to :15001; undo with `meshward capture uninstall`\n"
    );

    let shown = stdout(&meshward(&ns, &[], &["capture", "show"]));
    assert_eq!(shown, show(&ns.runner()).unwrap());
    assert!(
        shown.starts_with("# IPv4\n") && shown.contains("# IPv6\n"),
        "{shown}"
    );
    assert!(shown.contains("-A OUTPUT -j MESHWARD_OUTPUT\n"), "{shown}");
    assert!(
        shown.contains("-m mark --mark 0x539 -j RETURN\n"),
        "{shown}"
    );
    assert!(shown.contains("--dport 22 -j RETURN\n"), "{shown}");

    let removed = stdout(&meshward(&ns, &[], &["capture", "uninstall"]));
    assert_eq!(removed, "removed meshward's capture rules\n");
    for rules in all_rules(&ns) {
        assert!(!rules.contains("MESHWARD"), "uninstall left:\n{rules}");
    }
    let shown = stdout(&meshward(&ns, &[], &["capture", "show"]));
    assert_eq!(shown, "no meshward capture rule is installed\n");
    let again = stdout(&meshward(&ns, &[], &["capture", "uninstall"]));
    assert_eq!(again, "no meshward capture rule is installed\n");
}

#[test]
fn missing_privileges_or_iptables_are_named_with_the_fix() {
    if !root_or_skip() {
        return;
    }
    let ns = Netns::new();
    let before = all_rules(&ns);
    // Root without any capability (none left in the bounding set).
    let unprivileged = meshward(
        &ns,
        &["setpriv", "--bounding-set=-all", "--inh-caps=-all"],
        &["capture", "install"],
    );
    assert_eq!(unprivileged.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&unprivileged.stderr);
    assert!(
        stderr.contains(
            "capturing traffic needs root or CAP_NET_ADMIN in the workload's network namespace"
        ),
        "{stderr}"
    );

    let no_iptables = meshward(&ns, &["env", "PATH=/nonexistent"], &["capture", "install"]);
    assert_eq!(no_iptables.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&no_iptables.stderr);
    assert!(
        stderr.contains(
            "`iptables-save` was not found on PATH: install the iptables package (Debian: apt-get install iptables)"
        ),
        "{stderr}"
    );
    assert_eq!(all_rules(&ns), before);
}
