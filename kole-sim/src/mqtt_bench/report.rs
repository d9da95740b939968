//! The MQTT bench's readable table.

use crate::report::{Figures, Table, bytes, thousands};

/// The readable table: kole-over-MQTT's figures beside the KOLE paper's and the targets.
pub fn table(fig: &Figures) -> String {
    let num = |k: &str| fig.num(k).unwrap_or(f64::NAN);
    let s = |k: &str| match fig.get(k) {
        Some(crate::report::Value::Str(s)) => s.clone(),
        _ => String::new(),
    };
    let mut t = Table::new(format!(
        "kole-sim bench --transport mqtt: {} reference nodes over {} connections ({} subscriptions), broker {}",
        thousands(num("nodes") as u64),
        num("connections") as u64,
        s("subscriptions"),
        s("broker"),
    ));
    t.row("register every node (over the broker)", format!("{:.2} s", num("register_s")), "~260 s", "<= 30 s");
    t.row("one heartbeat from every node", format!("{:.2} s", num("heartbeat_s")), "~9.2 s", "n/a");
    t.row("  controller CPU for it", format!("{:.2} s", num("heartbeat_cpu_s")), "n/a", "<= 1 CPU-s");
    t.row("  controller CPU per heartbeat", format!("{:.2} µs", num("heartbeat_cpu_us_per_msg")), "n/a", "n/a");
    t.row("one workload delivered, all report running", format!("{:.2} s", num("distribute_s")), "~73 s", "<= 15 s");
    t.row("controller CPU, whole run", format!("{:.2} s", num("controller_cpu_s")), "n/a", "n/a");
    let broker_rss = fig.num("broker_rss_bytes").map_or("n/a (not a local process)".into(), |b| bytes(b as u64));
    t.row("broker peak RSS", broker_rss, "n/a", "n/a");
    let mut out = t.render();
    out.push_str(&format!(
        "  (subscribing took {:.2} s; the workload reached {} nodes; controller inbox drops {}, send failures {}; simulator connection errors {}; this process's peak RSS {})\n",
        num("subscribe_s"),
        thousands(num("distribute_targeted") as u64),
        num("controller_inbox_dropped") as u64,
        num("controller_send_failures") as u64,
        num("sim_connection_errors") as u64,
        bytes(num("peak_rss_bytes") as u64),
    ));
    out
}
