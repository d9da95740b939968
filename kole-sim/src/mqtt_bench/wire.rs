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

    /// Reads one whole packet from the client's side of `sock`.
    async fn next_packet(sock: &mut TcpStream, buf: &mut BytesMut) -> Packet {
        loop {
            match Packet::read(buf, MAX_PACKET) {
                Ok(p) => return p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    assert!(sock.read_buf(buf).await.unwrap() > 0, "the client closed");
                }
                Err(e) => panic!("the client sent a bad packet: {e:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_connection_frames_split_packets_acks_deliveries_and_keeps_its_in_flight_window() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, mut down_rx) = mpsc::channel(16);
        let (acks, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let sinks = Sinks { down, acks: acks.clone(), errors: errors.clone() };
        let opts = Options {
            host: "127.0.0.1".into(),
            port,
            client_id: "sim-test".into(),
            keep_alive: Duration::from_secs(60),
            inflight: 2,
        };
        let (sim, rx) = client(64);
        // Queued before the connection is up: sent after the CONNACK.
        for i in 0..3u8 {
            sim.try_publish(Publish::new(format!("up/{i}"), QoS::AtLeastOnce, vec![i])).unwrap();
        }
        sim.try_publish(Publish::new("up/beat", QoS::AtMostOnce, vec![9])).unwrap();
        let task = tokio::spawn(run(opts, rx, sinks));

        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        match next_packet(&mut sock, &mut buf).await {
            Packet::Connect(c) => assert_eq!((c.client_id.as_str(), c.clean_session), ("sim-test", true)),
            other => panic!("expected CONNECT, got {other:?}"),
        }
        // The broker's bytes one at a time: a CONNACK, then a QoS 1 delivery.
        let mut out = BytesMut::new();
        rumqttc::mqttbytes::v4::ConnAck::new(ConnectReturnCode::Success, false).write(&mut out).unwrap();
        let mut delivery = Publish::new("down/node/a", QoS::AtLeastOnce, b"spec".to_vec());
        delivery.pkid = 7;
        delivery.retain = true;
        delivery.write(&mut out).unwrap();
        for b in out.iter() {
            sock.write_all(&[*b]).await.unwrap();
            sock.flush().await.unwrap();
        }
        let got = down_rx.recv().await.unwrap();
        assert_eq!((got.topic.as_str(), &got.payload[..], got.retain), ("down/node/a", &b"spec"[..], true));

        // Two QoS 1 publishes fill the in-flight window; the third waits for an ack.
        let mut seen = Vec::new();
        let mut acked_delivery = false;
        while seen.len() < 2 || !acked_delivery {
            match next_packet(&mut sock, &mut buf).await {
                Packet::Publish(p) => seen.push((p.topic, p.pkid)),
                Packet::PubAck(a) => {
                    assert_eq!(a.pkid, 7);
                    acked_delivery = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, vec![("up/0".to_string(), 1), ("up/1".to_string(), 2)]);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), next_packet(&mut sock, &mut buf)).await.is_err(),
            "nothing more while two are in flight"
        );
        let mut out = BytesMut::new();
        PubAck::new(1).write(&mut out).unwrap();
        sock.write_all(&out).await.unwrap();
        match next_packet(&mut sock, &mut buf).await {
            Packet::Publish(p) => assert_eq!((p.topic.as_str(), p.pkid), ("up/2", 3)),
            other => panic!("unexpected {other:?}"),
        }
        // The QoS 0 publish is queued behind them: it goes when the window opens again.
        let mut out = BytesMut::new();
        PubAck::new(2).write(&mut out).unwrap();
        sock.write_all(&out).await.unwrap();
        match next_packet(&mut sock, &mut buf).await {
            Packet::Publish(p) => assert_eq!((p.topic.as_str(), p.qos), ("up/beat", QoS::AtMostOnce)),
            other => panic!("unexpected {other:?}"),
        }

        // An ack for a packet id not in flight is a protocol error: the connection counts it.
        let mut out = BytesMut::new();
        PubAck::new(40).write(&mut out).unwrap();
        sock.write_all(&out).await.unwrap();
        task.await.unwrap();
        assert_eq!(acks.load(Ordering::Relaxed), 1, "one CONNACK");
        assert_eq!(errors.load(Ordering::Relaxed), 1);
    }

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
