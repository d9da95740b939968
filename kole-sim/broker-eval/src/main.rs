//! broker-eval: start a candidate broker (`serve rumqttd|mqtt5 PORT`) or load one (`load PORT N`)
//! with a lean raw-TCP MQTT 3.1.1 client. The driver script reads the broker's RSS from /proc.
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args[2], args[3].parse().unwrap()),
        Some("load") => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(load(args[2].parse().unwrap(), args[3].parse().unwrap()));
        }
        _ => eprintln!("usage: broker-eval serve rumqttd|mqtt5 PORT | load PORT N"),
    }
}

fn serve(which: &str, port: u16) {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    match which {
        "rumqttd" => {
            let mut v4 = HashMap::new();
            v4.insert(
                "v4".to_string(),
                rumqttd::ServerSettings {
                    name: "v4".into(),
                    listen: addr,
                    tls: None,
                    next_connection_delay_ms: 0,
                    connections: rumqttd::ConnectionSettings {
                        connection_timeout_ms: 60_000,
                        max_payload_size: 256 * 1024,
                        max_inflight_count: 100,
                        auth: None,
                        external_auth: None,
                        dynamic_filters: true,
                    },
                },
            );
            let config = rumqttd::Config {
                id: 0,
                router: rumqttd::RouterConfig {
                    max_connections: 100_010,
                    max_outgoing_packet_count: 200,
                    max_segment_size: 104_857_600,
                    max_segment_count: 10,
                    custom_segment: None,
                    initialized_filters: None,
                    shared_subscriptions_strategy: Default::default(),
                },
                v4: Some(v4),
                v5: None,
                ws: None,
                cluster: None,
                console: None,
                bridge: None,
                prometheus: None,
                metrics: None,
            };
            rumqttd::Broker::new(config).start().unwrap();
        }
        _ => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(async {
                let config = mqtt5::broker::config::BrokerConfig::default()
                    .with_bind_address(addr)
                    .with_max_clients(200_000)
                    .with_storage(mqtt5::broker::config::StorageConfig {
                        backend: mqtt5::broker::config::StorageBackend::Memory,
                        enable_persistence: false,
                        ..Default::default()
                    });
                let mut b = mqtt5::broker::MqttBroker::with_config(config).await.unwrap();
                b.run().await.unwrap();
            });
        }
    }
}

fn connect_packet(id: &str) -> Vec<u8> {
    let mut v = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    v.extend_from_slice(&(id.len() as u16).to_be_bytes());
    v.extend_from_slice(id.as_bytes());
    frame(0x10, &v)
}

fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

async fn connect(port: u16, id: &str, src: u8) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("127.0.0.{src}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(format!("127.0.0.1:{port}").parse().unwrap()).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&connect_packet(id)).await.unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack[0], 0x20, "CONNACK");
    s
}

async fn load(port: u16, n: usize) {
    // Connect rate: n connections, 256 in flight.
    let t = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let k = (n - i).min(256);
        let mut set = tokio::task::JoinSet::new();
        for j in i..i + k {
            set.spawn(async move { connect(port, &format!("c{j}"), 2 + (j % 200) as u8).await });
        }
        while let Some(r) = set.join_next().await {
            conns.push(r.unwrap());
        }
        i += k;
    }
    let secs = t.elapsed().as_secs_f64();
    println!("connections={n} connect_s={secs:.3} connect_rate={:.0}/s", n as f64 / secs);
    println!("READY");
    tokio::time::sleep(Duration::from_secs(3)).await; // the driver samples RSS now

    // Throughput: one subscriber on t/#, one publisher, 64-byte QoS 0 payloads.
    let mut sub = connect(port, "sub", 1).await;
    let mut body = vec![0, 3, b't', b'/', b'#', 0];
    body.splice(0..0, [0u8, 1]);
    sub.write_all(&frame(0x82, &body)).await.unwrap();
    let mut suback = [0u8; 5];
    sub.read_exact(&mut suback).await.unwrap();
    let mut publ = connect(port, "pub", 1).await;
    let msgs = 1_000_000usize;
    let mut pkt = vec![0, 3, b't', b'/', b'x'];
    pkt.extend_from_slice(&[7u8; 64]);
    let one = frame(0x30, &pkt);
    let per = one.len();
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let batch: Vec<u8> = one.iter().copied().cycle().take(per * 1000).collect();
        for _ in 0..msgs / 1000 {
            publ.write_all(&batch).await.unwrap();
        }
        publ
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < msgs * per && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), sub.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(k)) => got += k,
            Ok(Err(_)) => break,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let _publ = writer.await;
    println!(
        "throughput_msgs={} of {msgs} in {secs:.3}s = {:.0} msg/s (64 B QoS 0, 1 pub -> 1 sub)",
        got / per,
        (got / per) as f64 / secs
    );
    drop(conns);
}
