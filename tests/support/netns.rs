//! Test hosts made of network namespaces: a storage "target" host and node hosts, each
//! joined to the target by its own veth pair, with private addresses. Everything is
//! removed on drop, also when the test fails.
#![allow(dead_code)]

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The target's service address, reachable from every node host.
pub const TARGET_IP: &str = "10.77.0.1";

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct NetLab {
    prefix: String,
    nodes: Vec<String>,
}

impl NetLab {
    /// `<prefix>-t` plus one namespace per node, linked to the target. Node `i` is
    /// 10.77.<i+1>.2 and reaches TARGET_IP through its link.
    pub fn new(nodes: &[&str]) -> NetLab {
        let prefix = format!("hcsi{}", std::process::id() % 100_000);
        let lab = NetLab {
            prefix: prefix.clone(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        };
        let t = lab.target_ns();
        ip(&["netns", "add", &t]);
        ip(&["-n", &t, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &t,
            "addr",
            "add",
            &format!("{TARGET_IP}/32"),
            "dev",
            "lo",
        ]);
        for (i, _) in nodes.iter().enumerate() {
            let ns = lab.node_ns_at(i);
            let (host_end, node_end) = (format!("{prefix}t{i}"), format!("{prefix}n{i}"));
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "link", "add", &host_end, "netns", &t, "type", "veth", "peer", "name", &node_end,
                "netns", &ns,
            ]);
            let net = i + 1;
            ip(&[
                "-n",
                &t,
                "addr",
                "add",
                &format!("10.77.{net}.1/24"),
                "dev",
                &host_end,
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.{net}.2/24"),
                "dev",
                &node_end,
            ]);
            ip(&["-n", &t, "link", "set", &host_end, "up"]);
            ip(&["-n", &ns, "link", "set", &node_end, "up"]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                &format!("{TARGET_IP}/32"),
                "via",
                &format!("10.77.{net}.1"),
            ]);
        }
        lab
    }

    pub fn target_ns(&self) -> String {
        format!("{}-t", self.prefix)
    }

    fn node_ns_at(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }

    pub fn node_ns(&self, node: &str) -> String {
        let i = self
            .nodes
            .iter()
            .position(|n| n == node)
            .expect("known node");
        self.node_ns_at(i)
    }

    /// Takes the node's link down (`up = false`) or up again.
    pub fn set_link(&self, node: &str, up: bool) {
        let i = self
            .nodes
            .iter()
            .position(|n| n == node)
            .expect("known node");
        let ns = self.node_ns_at(i);
        let state = if up { "up" } else { "down" };
        ip(&[
            "-n",
            &ns,
            "link",
            "set",
            &format!("{}n{i}", self.prefix),
            state,
        ]);
        if up {
            // Taking a link down flushes the routes through it.
            ip(&[
                "-n",
                &ns,
                "route",
                "replace",
                &format!("{TARGET_IP}/32"),
                "via",
                &format!("10.77.{}.1", i + 1),
            ]);
        }
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends too.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.target_ns()])
            .status();
        for i in 0..self.nodes.len() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.node_ns_at(i)])
                .status();
        }
    }
}

/// Makes `cmd` run in network namespace `ns` (only the network: mounts, loop devices
/// and files stay shared with the test, as on one machine's kernel).
pub fn enter(cmd: &mut Command, ns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns exists");
    // SAFETY: setns is async-signal-safe; the fd stays open in the parent until spawn.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
}
