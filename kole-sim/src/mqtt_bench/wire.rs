//! The simulator's MQTT 3.1.1 connections: a plain TCP client that writes every packet queued
//! since its last write in one system call.
//!
//! Each simulator connection carries thousands of simulated nodes. rumqttc's event loop writes
//! and flushes every publish on its own; with a million status reports queued at once, the
//! simulator's core spent over half its time in `writev` (one system call, and one loopback
//! segment, per publish), time the broker and the controller under test then did not get. A real
//! node writes its own messages on its own machine. What the broker does per message does not
//! change: Mosquitto 2.0 reads a packet at a time (its fixed header byte by byte, then the rest),
//! however the bytes arrived.
//!
//! Packets are encoded and decoded by rumqttc's `mqttbytes`; this module only frames the
//! connection: CONNECT/CONNACK, SUBSCRIBE/SUBACK, QoS 0 and 1 publishes with packet ids and an
//! in-flight limit, PUBACKs for the broker's QoS 1 deliveries, and keep-alive pings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PingReq, PubAck, Subscribe};
use rumqttc::{ConnectReturnCode, Publish, QoS, SubscribeFilter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Largest packet read or written (the broker's 256 KiB payload limit plus any topic).
const MAX_PACKET: usize = 512 * 1024;
/// Most bytes gathered into one write.
const WRITE_CHUNK: usize = 256 * 1024;

/// What the simulator asks of a connection.
pub(super) enum Request {
    Publish(Publish),
    Subscribe(Vec<SubscribeFilter>),
    Disconnect,
}

/// The simulator's handle on one connection: a bounded request queue.
#[derive(Clone)]
pub(super) struct SimClient {
    tx: mpsc::Sender<Request>,
}

impl SimClient {
    /// Queues a publish without waiting; gives it back when the queue is full.
    pub(super) fn try_publish(&self, msg: Publish) -> Result<(), Publish> {
        match self.tx.try_send(Request::Publish(msg)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Request::Publish(p))) => Err(p),
            // The connection is gone: the phase will time out and report the connection errors.
            Err(_) => Ok(()),
        }
    }

    /// Queues one SUBSCRIBE packet of `filters`, waiting for queue room.
    pub(super) async fn subscribe_many(&self, filters: Vec<SubscribeFilter>) -> Result<(), String> {
        self.tx.send(Request::Subscribe(filters)).await.map_err(|_| "the connection is closed".to_string())
    }

    /// Queues one subscription without waiting (dropped if the queue is full).
    pub(super) fn try_subscribe(&self, filter: String, qos: QoS) {
        let _ = self.tx.try_send(Request::Subscribe(vec![SubscribeFilter::new(filter, qos)]));
    }

    /// Asks the connection to close.
    pub(super) fn try_disconnect(&self) {
        let _ = self.tx.try_send(Request::Disconnect);
    }
}

/// Where a connection reports.
pub(super) struct Sinks {
    /// Every downlink publish, in arrival order.
    pub(super) down: mpsc::Sender<Publish>,
    /// CONNACKs and SUBACKs received.
    pub(super) acks: Arc<AtomicU64>,
    /// Connections lost or refused.
    pub(super) errors: Arc<AtomicU64>,
}

/// Settings of one connection.
pub(super) struct Options {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) client_id: String,
    pub(super) keep_alive: Duration,
    /// Most QoS 1 publishes (and subscribes) awaiting their ack.
    pub(super) inflight: u16,
}

/// Opens a connection's queue; [`run`] serves it.
pub(super) fn client(queue: usize) -> (SimClient, mpsc::Receiver<Request>) {
    let (tx, rx) = mpsc::channel(queue.max(1));
    (SimClient { tx }, rx)
}

/// Connects and serves the connection until it is asked to close or fails (a failure counts in
/// `sinks.errors`; clean session, so there is no reconnect: the phase then times out and says
/// why).
pub(super) async fn run(opts: Options, rx: mpsc::Receiver<Request>, sinks: Sinks) {
    if let Err(e) = serve(&opts, rx, &sinks).await {
        if sinks.down.is_closed() {
            // The bench is over and no longer reads: not a failure.
            return;
        }
        // The count fails the phase; the reason goes to stderr beside the progress lines.
        eprintln!("simulator connection {}: {e}", opts.client_id);
        sinks.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Packet ids in use (QoS 1 publishes and subscribes awaiting their ack).
struct PacketIds {
    used: Vec<bool>,
    next: u16,
    inflight: usize,
}

impl PacketIds {
    fn new() -> Self {
        Self { used: vec![false; 1 << 16], next: 1, inflight: 0 }
    }

    /// A free id (the caller keeps `inflight` below 65,535).
    fn take(&mut self) -> u16 {
        loop {
            let id = self.next;
            self.next = if self.next == u16::MAX { 1 } else { self.next + 1 };
            if !self.used[usize::from(id)] {
                self.used[usize::from(id)] = true;
                self.inflight += 1;
                return id;
            }
        }
    }

    /// Releases `id`; whether it was in use.
    fn release(&mut self, id: u16) -> bool {
        let slot = &mut self.used[usize::from(id)];
        let was = std::mem::replace(slot, false);
        if was {
            self.inflight -= 1;
        }
        was
    }
}

async fn serve(opts: &Options, mut rx: mpsc::Receiver<Request>, sinks: &Sinks) -> Result<(), String> {
    let stream = TcpStream::connect((opts.host.as_str(), opts.port))
        .await
        .map_err(|e| format!("connecting to {}:{}: {e}", opts.host, opts.port))?;
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut wbuf = BytesMut::with_capacity(WRITE_CHUNK + MAX_PACKET);
    let mut connect = Connect::new(opts.client_id.clone());
    connect.keep_alive = u16::try_from(opts.keep_alive.as_secs()).unwrap_or(u16::MAX);
    connect.clean_session = true;
    connect.write(&mut wbuf).map_err(|e| format!("encoding CONNECT: {e:?}"))?;
    wr.write_all(&wbuf).await.map_err(|e| format!("writing CONNECT: {e}"))?;
    wbuf.clear();

    let max_inflight = usize::from(opts.inflight.clamp(1, u16::MAX - 1));
    let mut ids = PacketIds::new();
    let mut connected = false;
    let mut closing = false;
    let mut ping = tokio::time::interval(opts.keep_alive.max(Duration::from_secs(2)) / 2);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        // Everything queued that flow control allows joins this write.
        while connected && !closing && ids.inflight < max_inflight && wbuf.len() < WRITE_CHUNK {
            match rx.try_recv() {
                Ok(req) => closing = encode(req, &mut ids, &mut wbuf)?,
                Err(_) => break,
            }
        }
        if !wbuf.is_empty() {
            wr.write_all(&wbuf).await.map_err(|e| format!("writing: {e}"))?;
            wbuf.clear();
            continue;
        }
        if closing {
            let _ = wr.shutdown().await;
            return Ok(());
        }
        tokio::select! {
            r = rd.read_buf(&mut rbuf) => {
                match r {
                    Ok(0) => return Err("the broker closed the connection".into()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("reading: {e}")),
                }
                loop {
                    match Packet::read(&mut rbuf, MAX_PACKET) {
                        Ok(packet) => handle(packet, &mut ids, &mut wbuf, &mut connected, sinks).await?,
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(e) => return Err(format!("decoding a packet from the broker: {e:?}")),
                    }
                }
            }
            req = rx.recv(), if connected && ids.inflight < max_inflight => match req {
                Some(req) => closing = encode(req, &mut ids, &mut wbuf)?,
                None => closing = true,
            },
            _ = ping.tick() => {
                PingReq.write(&mut wbuf).map_err(|e| format!("encoding PINGREQ: {e:?}"))?;
            }
        }
    }
}

/// Encodes one request into `wbuf`; whether it asks to close.
fn encode(req: Request, ids: &mut PacketIds, wbuf: &mut BytesMut) -> Result<bool, String> {
    match req {
        Request::Publish(mut p) => {
            p.pkid = if p.qos == QoS::AtMostOnce { 0 } else { ids.take() };
            p.write(wbuf).map_err(|e| format!("encoding PUBLISH on {}: {e:?}", p.topic))?;
        }
        Request::Subscribe(filters) => {
            let mut s = Subscribe::new_many(filters);
            s.pkid = ids.take();
            s.write(wbuf).map_err(|e| format!("encoding SUBSCRIBE: {e:?}"))?;
        }
        Request::Disconnect => {
            rumqttc::mqttbytes::v4::Disconnect.write(wbuf).map_err(|e| format!("encoding DISCONNECT: {e:?}"))?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// Handles one packet from the broker; acks go to `wbuf`.
async fn handle(
    packet: Packet,
    ids: &mut PacketIds,
    wbuf: &mut BytesMut,
    connected: &mut bool,
    sinks: &Sinks,
) -> Result<(), String> {
    match packet {
        Packet::ConnAck(ack) => {
            if ack.code != ConnectReturnCode::Success {
                return Err(format!("the broker refused the connection: {:?}", ack.code));
            }
            *connected = true;
            sinks.acks.fetch_add(1, Ordering::Relaxed);
        }
        Packet::Publish(p) => {
            if p.qos != QoS::AtMostOnce {
                PubAck::new(p.pkid).write(wbuf).map_err(|e| format!("encoding PUBACK: {e:?}"))?;
            }
            // Awaiting is safe: the agents' loop never waits on this connection.
            if sinks.down.send(p).await.is_err() {
                return Err("the simulator stopped".into());
            }
        }
        Packet::PubAck(ack) => {
            if !ids.release(ack.pkid) {
                return Err(format!("PUBACK for packet id {} that is not in flight", ack.pkid));
            }
        }
        Packet::SubAck(ack) => {
            if !ids.release(ack.pkid) {
                return Err(format!("SUBACK for packet id {} that is not in flight", ack.pkid));
            }
            sinks.acks.fetch_add(1, Ordering::Relaxed);
        }
        Packet::PingResp => {}
        other => return Err(format!("unexpected packet from the broker: {other:?}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap() {
        let mut ids = PacketIds::new();
        let first = ids.take();
        assert_eq!(first, 1);
        for _ in 2..=u16::MAX {
            let id = ids.take();
            assert!(ids.release(id));
        }
        // Wrapped past 65,535 to 1, which is still in flight: skipped.
        assert_eq!(ids.take(), 2);
        assert!(ids.release(first));
        assert!(!ids.release(first), "released twice");
        assert_eq!(ids.inflight, 1);
    }
}
