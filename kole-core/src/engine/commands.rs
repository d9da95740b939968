//! Workload commands: applying, deleting, pausing, resuming and rolling back workloads, publishing
//! their specs, and the commands the engine sends to single nodes.

use crate::cache::NodeCache;
use crate::model::NodeName;
use crate::model::{Timestamp, ValidationError, Workload, WorkloadId};
use crate::protocol::{self, Command, CommandKind, GroupName, Message, WorkloadRemoved, WorkloadSpec};
use crate::transport::{Destination, Outbound};

use super::rollout::{RolloutPhase, WorkloadEntry};
use super::{Core, EngineEvent, Outputs, WorkloadCommand};

impl Core {
    pub(super) fn workload(&mut self, cache: &NodeCache, cmd: &WorkloadCommand, now: Timestamp, out: &mut Outputs) {
        match cmd {
            WorkloadCommand::Apply { workload, progress } => {
                if let Err(e) = validate_workload(workload) {
                    out.events.push(EngineEvent::CommandRejected { id: workload.id.clone(), reason: e.to_string() });
                    return;
                }
                if let Err(reason) = self.check_deliverable(workload) {
                    out.events.push(EngineEvent::CommandRejected { id: workload.id.clone(), reason });
                    return;
                }
                let existing = self.by_id.get(&workload.id).copied();
                let (idx, publish) = match existing {
                    Some(i) => {
                        let Some(old) = self.workloads[i as usize].as_ref() else { return };
                        if *old.current == *workload {
                            return; // Nothing changed (a re-list after a watch restart).
                        }
                        let previous = if old.current.version == workload.version {
                            old.previous.as_deref().cloned()
                        } else {
                            Some((*old.current).clone())
                        };
                        let entry = WorkloadEntry::new(workload.clone(), previous, 0, RolloutPhase::Progressing);
                        self.workloads[i as usize] = Some(entry);
                        (i as usize, true)
                    }
                    None => {
                        let entry = match progress {
                            Some(p) => WorkloadEntry::new(workload.clone(), p.previous.clone(), p.wave, p.phase),
                            None => WorkloadEntry::new(workload.clone(), None, 0, RolloutPhase::Progressing),
                        };
                        let i = match self.workloads.iter().position(Option::is_none) {
                            Some(free) => {
                                self.workloads[free] = Some(entry);
                                free
                            }
                            None => {
                                self.workloads.push(Some(entry));
                                self.workloads.len() - 1
                            }
                        };
                        self.by_id.insert(workload.id.clone(), i as u32);
                        (i, !progress.as_ref().is_some_and(|p| p.published))
                    }
                };
                self.generation += 1;
                if publish {
                    self.publish(cache, idx, 0, now, out);
                }
            }
            WorkloadCommand::Delete(id) => {
                let Some(i) = self.by_id.remove(id) else { return };
                let Some(e) = self.workloads[i as usize].take() else { return };
                self.generation += 1;
                self.reported.remove(id);
                let removed = Message::WorkloadRemoved(WorkloadRemoved { id: id.clone() });
                match &e.current.delivery {
                    crate::model::DeliveryMode::Group(g) => {
                        if let Ok(group) = GroupName::new(g.clone()) {
                            out.messages.push(Outbound {
                                to: Destination::GroupWorkloadSpec(group.clone(), id.clone()),
                                payload: Vec::new(),
                                retain: true,
                            });
                            self.send(out, Destination::Group(group), &removed, false);
                        }
                    }
                    _ => {
                        out.messages.push(Outbound {
                            to: Destination::WorkloadSpec(id.clone()),
                            payload: Vec::new(),
                            retain: true,
                        });
                        self.send(out, Destination::Fleet, &removed, false);
                    }
                }
                self.spec_changed_ms = now.as_millis();
            }
            WorkloadCommand::Pause(id) => {
                if let Some(e) = self.entry_mut(id)
                    && e.phase == RolloutPhase::Progressing
                {
                    e.phase = RolloutPhase::Paused;
                    e.health = None;
                }
            }
            WorkloadCommand::Resume(id) => {
                if let Some(e) = self.entry_mut(id)
                    && matches!(e.phase, RolloutPhase::Paused | RolloutPhase::Halted)
                {
                    e.phase = RolloutPhase::Progressing;
                    // Wave health was not kept while held: count it again.
                    e.health = None;
                    // Time held does not count against the progress deadline.
                    e.wave_since_ms = 0;
                    e.deadline_exceeded = false;
                }
            }
            WorkloadCommand::Rollback(id) => {
                let Some(&i) = self.by_id.get(id) else { return };
                let Some(e) = self.workloads[i as usize].as_ref() else { return };
                let Some(prev) = e.previous.as_deref().cloned() else {
                    out.events.push(EngineEvent::CommandRejected {
                        id: id.clone(),
                        reason: "no previous version to roll back to".into(),
                    });
                    return;
                };
                let last = prev.rollout.waves.len().saturating_sub(1);
                self.workloads[i as usize] = Some(WorkloadEntry::new(prev, None, last, RolloutPhase::Complete));
                self.generation += 1;
                self.publish(cache, i as usize, 0, now, out);
            }
            WorkloadCommand::ReconcileRetained { found, live } => self.reconcile_retained(found, live, out),
        }
    }

    /// Clears the retained specs of workloads that are neither held nor live, and tells their
    /// audience (fleet or group) the workload was removed. A held workload's spec on another
    /// destination (its delivery changed while nobody led) is left alone: clearing it would make
    /// that group's nodes remove a workload they still run, and the heartbeat digest repairs them.
    fn reconcile_retained(&mut self, found: &[Destination], live: &[WorkloadId], out: &mut Outputs) {
        let live: std::collections::HashSet<&WorkloadId> = live.iter().collect();
        for d in found {
            let (id, audience) = match d {
                Destination::WorkloadSpec(id) => (id, Destination::Fleet),
                Destination::GroupWorkloadSpec(g, id) => (id, Destination::Group(g.clone())),
                _ => continue,
            };
            if self.by_id.contains_key(id) || live.contains(id) {
                continue;
            }
            out.messages.push(Outbound { to: d.clone(), payload: Vec::new(), retain: true });
            let removed = Message::WorkloadRemoved(WorkloadRemoved { id: id.clone() });
            self.send(out, audience, &removed, false);
            out.events.push(EngineEvent::StaleSpecCleared { id: id.clone(), destination: d.clone() });
        }
    }

    /// Whether the agents could decode this workload's spec message and the transport could carry
    /// it; otherwise why not and what to do, for the `CommandRejected` reason. A spec nobody can
    /// decode would be published (and retained) anyway and leave every targeted node failing to
    /// read it. Checked on the largest form the message takes: every wave threshold encodes in the
    /// same size, and per-node delivery carries the same workload inside a desired state.
    fn check_deliverable(&self, workload: &Workload) -> Result<(), String> {
        let msg = Message::WorkloadSpec(WorkloadSpec { workload: workload.clone(), wave_threshold: 0 });
        // Signed, the message is 76 bytes longer: measure what will be sent.
        let bytes = match &self.signer {
            Some(s) => s.seal(&msg, &Destination::Fleet, 0),
            None => protocol::encode(&msg),
        };
        let agents = &self.cfg.agent_decode_limits;
        let limit = agents.max_message_bytes.min(self.cfg.max_payload_bytes);
        if bytes.len() > limit {
            let whose = if agents.max_message_bytes <= self.cfg.max_payload_bytes {
                "the agents' decode limit"
            } else {
                "the transport's payload limit"
            };
            return Err(format!(
                "the encoded spec message is {} bytes, over {whose} of {limit} bytes (the runtime spec is {} \
                 bytes); make the spec smaller, e.g. move large content into the image or a volume the \
                 workload fetches",
                bytes.len(),
                workload.spec.len()
            ));
        }
        protocol::seal::decode_unverified(&bytes, agents).map(|_| ()).map_err(|e| {
            format!(
                "agents could not decode this workload's spec message: {e}; bring the spec within the agents' limits"
            )
        })
    }

    fn entry_mut(&mut self, id: &WorkloadId) -> Option<&mut WorkloadEntry> {
        let i = *self.by_id.get(id)?;
        self.workloads[i as usize].as_mut()
    }

    pub(super) fn publish(
        &mut self,
        cache: &NodeCache,
        idx: usize,
        from_threshold: u16,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        let Some(e) = &self.workloads[idx] else { return };
        let id = e.current.id.clone();
        match &e.current.delivery {
            crate::model::DeliveryMode::Broadcast => {
                let msg = Message::WorkloadSpec(e.spec_message());
                self.send(out, Destination::WorkloadSpec(id), &msg, true);
                self.stats.spec_publishes += 1;
            }
            crate::model::DeliveryMode::Group(g) => {
                let msg = Message::WorkloadSpec(e.spec_message());
                if let Ok(group) = GroupName::new(g.clone()) {
                    self.send(out, Destination::GroupWorkloadSpec(group, id), &msg, true);
                    self.stats.spec_publishes += 1;
                }
            }
            crate::model::DeliveryMode::PerNode => {
                // The fallback for specs that must not be broadcast: each node newly in the waves
                // gets its full desired state.
                let to = e.threshold();
                let seed = e.seed;
                let mut slots = Vec::new();
                for set in cache.matching_sets(&e.current.selector) {
                    for &slot in cache.members_of(set) {
                        let p = crate::model::wave_point_seeded(seed, cache.name_bytes(slot));
                        if p >= from_threshold && p < to {
                            slots.push(slot);
                        }
                    }
                }
                for slot in slots {
                    let d = self.desired(cache, slot);
                    self.send_catchup(cache, slot, d, out);
                    self.stats.catchups -= 1;
                    self.stats.per_node_deliveries += 1;
                }
            }
        }
        self.spec_changed_ms = now.as_millis();
    }

    pub(super) fn send_command(&mut self, out: &mut Outputs, node: &NodeName, kind: CommandKind) {
        let id = self.next_command_id;
        self.next_command_id += 1;
        self.send(out, Destination::Node(node.clone()), &Message::Command(Command { id, kind }), false);
    }
}

fn validate_workload(w: &Workload) -> Result<(), ValidationError> {
    w.rollout.validate()?;
    if let crate::model::DeliveryMode::Group(g) = &w.delivery {
        GroupName::new(g.clone())
            .map_err(|_| ValidationError::Rollout { reason: "group name is not a valid topic level" })?;
    }
    Ok(())
}
