//! Hosts of our own, without a container engine: each member runs in a network namespace the
//! test creates, with its own address and name on a bridge the test also creates (in a
//! namespace of its own, so the only thing added to the machine's own network is one veth
//! with an address in a /24 no other link uses). Members reach each other by name
//! (`/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over `/etc/hosts`); the test reaches
//! them by address through that veth.
//!
//! Faults: drop the packets from any member to any other (one direction, or both with
//! `partition`), take a member's link down, heal. Pausing and killing are the `Server`'s.
//! Everything is removed on drop, also when the test fails; namespaces left by a test process
//! that was itself killed are removed by the next `Net::create`.

use std::collections::HashSet;
use std::process::Command;
use std::sync::Mutex;

/// A member's host: its network namespace, address and name.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub ip: String,
    pub name: String,
}

pub struct Net {
    /// Prefix of every namespace of this net: `oxt-<pid>-<seq>`.
    prefix: String,
    /// The namespace holding the bridge.
    switch: String,
    /// The veth end in the machine's own namespace.
    host_link: String,
    subnet: String,
    pub hosts: Vec<Host>,
}

/// Subnets handed out by this process (tests of one binary run in parallel).
static SUBNETS: Mutex<Option<HashSet<String>>> = Mutex::new(None);
static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Runs a command, panicking with its stderr if it fails.
pub fn sh(args: &[&str]) -> String {
    super::run_ok(&format!("{args:?}"), Command::new(args[0]).args(&args[1..]))
}

fn ns_sh(ns: &str, args: &[&str]) -> String {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    sh(&all)
}

/// Requires what the hosts need: root and `ip`/`nft` (Debian's iproute2 and nftables, which
/// scripts/test.sh installs). A missing tool fails the test; it never skips.
fn require_tools() {
    assert!(
        Command::new("ip").arg("-V").output().is_ok(),
        "`ip` (iproute2) is needed for the namespace hosts"
    );
    assert!(
        Command::new("nft").arg("--version").output().is_ok(),
        "`nft` (nftables) is needed for the namespace hosts"
    );
}

/// Removes the namespaces of test processes that are gone (killed before their drop ran).
fn remove_stale() {
    let list = sh(&["ip", "netns", "list"]);
    for line in list.lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = ns.strip_prefix("oxt-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // Its servers outlived it: kill them before their namespace goes.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", p]).output();
                }
            }
            // A container of its (named after its namespace) is gone with the process; runc
            // keeps its state until deleted.
            let _ = Command::new("runc")
                .args(["delete", "--force", ns])
                .output();
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

fn pick_subnet() -> String {
    let used_now = sh(&["ip", "-4", "-o", "addr"]) + &sh(&["ip", "-4", "route"]);
    let mut guard = SUBNETS.lock().unwrap();
    let taken = guard.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let s = format!(
            "10.{}.{}",
            rand::random_range(201..=250u8),
            rand::random::<u8>()
        );
        if !taken.contains(&s) && !used_now.contains(&format!("{s}.")) {
            taken.insert(s.clone());
            return s;
        }
    }
    panic!("no free 10.x.y.0/24 for the test hosts");
}

impl Net {
    /// A bridge with one host per name; host `i` gets address `<subnet>.<10+i>`.
    pub fn create(names: &[String]) -> Net {
        require_tools();
        remove_stale();
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("oxt-{}-{seq}", std::process::id());
        let subnet = pick_subnet();
        let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let mut net = Net {
            switch: format!("{prefix}-sw"),
            host_link: format!("oxt{tag}h"),
            prefix,
            subnet: subnet.clone(),
            hosts: vec![],
        };
        // From here on, a failure still removes what was made (Drop).
        sh(&["ip", "netns", "add", &net.switch]);
        ns_sh(&net.switch, &["ip", "link", "add", "br0", "type", "bridge"]);
        ns_sh(&net.switch, &["ip", "link", "set", "br0", "up"]);
        // The test's own way in: a veth from the machine's namespace onto the bridge.
        let sw_end = format!("oxt{tag}s");
        sh(&[
            "ip",
            "link",
            "add",
            &net.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &sw_end,
            "netns",
            &net.switch,
        ]);
        ns_sh(
            &net.switch,
            &["ip", "link", "set", &sw_end, "master", "br0"],
        );
        ns_sh(&net.switch, &["ip", "link", "set", &sw_end, "up"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.1/24"),
            "dev",
            &net.host_link,
        ]);
        sh(&["ip", "link", "set", &net.host_link, "up"]);

        let mut hosts_file = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (i, name) in names.iter().enumerate() {
            let ip = format!("{subnet}.{}", 10 + i);
            hosts_file.push_str(&format!("{ip} {name}\n"));
            net.hosts.push(Host {
                ns: format!("{}-m{i}", net.prefix),
                ip,
                name: name.clone(),
            });
        }
        for (i, h) in net.hosts.clone().iter().enumerate() {
            sh(&["ip", "netns", "add", &h.ns]);
            // Made in place: nothing of it ever sits in the machine's own namespace.
            let outside = format!("oxt{tag}{i}p");
            sh(&[
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                &h.ns,
                "type",
                "veth",
                "peer",
                "name",
                &outside,
                "netns",
                &net.switch,
            ]);
            ns_sh(
                &net.switch,
                &["ip", "link", "set", &outside, "master", "br0"],
            );
            ns_sh(&net.switch, &["ip", "link", "set", &outside, "up"]);
            ns_sh(
                &h.ns,
                &["ip", "addr", "add", &format!("{}/24", h.ip), "dev", "eth0"],
            );
            ns_sh(&h.ns, &["ip", "link", "set", "eth0", "up"]);
            ns_sh(&h.ns, &["ip", "link", "set", "lo", "up"]);
            let etc = format!("/etc/netns/{}", h.ns);
            std::fs::create_dir_all(&etc).expect("create /etc/netns/<ns>");
            std::fs::write(format!("{etc}/hosts"), &hosts_file).expect("write hosts");
            // The member's own filter: faults are drop rules in its input chain.
            ns_sh(
                &h.ns,
                &[
                    "nft",
                    "add table inet oxt; add chain inet oxt input { type filter hook input priority 0; policy accept; }",
                ],
            );
        }
        net
    }

    /// The address the test itself has on the bridge (packets from it are never dropped).
    pub fn test_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// Drops every packet host `from` sends to host `to` (one direction: `to`'s answers to
    /// `from` still leave, but TCP between them stalls either way).
    pub fn drop_packets(&self, from: usize, to: usize) {
        let rule = format!(
            "add rule inet oxt input ip saddr {} drop",
            self.hosts[from].ip
        );
        ns_sh(&self.hosts[to].ns, &["nft", &rule]);
    }

    /// Cuts every host of `a` off every host of `b`, both directions. The test still reaches
    /// everyone (clients of a minority see it refuse, rather than time out at TCP).
    pub fn partition(&self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                self.drop_packets(x, y);
                self.drop_packets(y, x);
            }
        }
    }

    /// Cuts host `i` off every other host (clients still reach it).
    pub fn isolate(&self, i: usize) {
        let others: Vec<usize> = (0..self.hosts.len()).filter(|&j| j != i).collect();
        self.partition(&[i], &others);
    }

    /// Removes every drop rule.
    pub fn heal(&self) {
        for h in &self.hosts {
            ns_sh(&h.ns, &["nft", "flush chain inet oxt input"]);
        }
    }

    /// Takes host `i`'s link down (or up again): nobody, the test included, reaches it.
    pub fn set_link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ns_sh(&self.hosts[i].ns, &["ip", "link", "set", "eth0", state]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and with them their peers.
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).output();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", h.ns));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
        if let Ok(mut g) = SUBNETS.lock() {
            if let Some(s) = g.as_mut() {
                s.remove(&self.subnet);
            }
        }
    }
}
