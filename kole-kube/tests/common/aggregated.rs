//! Registering an aggregated API served by this process with a real apiserver: a Service without
//! selector, its Endpoints on this machine's non-loopback address (Endpoints refuse loopback; the
//! apiserver runs with `--enable-aggregator-routing=true`) and an `APIService` trusting the
//! server's self-signed certificate. Shared by the edgenodes tier and `examples/edgenodes_bench.rs`.

#![allow(dead_code)]

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::{APIService, APIServiceSpec, ServiceReference};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Client};

/// Regions of the synthetic fleet: node `i` is in `REGIONS[i % 3]`.
pub const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];

/// Node `i` of a synthetic fleet: `node-<i, 7 digits>`, its region, tier `gold` every tenth node
/// (else `std`), `amd64` when even (else `arm64`), address `10.<i as three bytes>`.
pub fn registration(i: usize) -> kole_core::model::NodeRegistration {
    use kole_core::model::{DesiredDigest, Labels, NodeInfo, NodeName, NodeRegistration};
    NodeRegistration {
        name: NodeName::new(format!("node-{i:07}")).unwrap(),
        labels: Labels::from_pairs([
            ("region", REGIONS[i % 3]),
            ("tier", if i.is_multiple_of(10) { "gold" } else { "std" }),
        ])
        .unwrap(),
        info: NodeInfo {
            arch: if i.is_multiple_of(2) { "amd64" } else { "arm64" }.into(),
            os: "linux-6.1".into(),
            agent_version: "0.1.0".into(),
            addresses: vec![IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8])],
        },
        applied: DesiredDigest(0),
        workloads: vec![],
    }
}

pub const APISERVICE: &str = "v1alpha1.edge.kole.dev";
pub const SERVICE: &str = "kole-edgenodes";

/// This machine's address toward the outside: one the apiserver can dial and Endpoints accept.
pub fn external_ip() -> IpAddr {
    if let Ok(ip) = std::env::var("KOLE_TEST_SERVE_IP") {
        return ip.parse().expect("KOLE_TEST_SERVE_IP is an IP address");
    }
    for probe in ["10.255.255.255:9", "192.0.2.255:9", "8.8.8.8:53"] {
        if let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0")
            && s.connect(probe).is_ok()
            && let Ok(a) = s.local_addr()
            && !a.ip().is_loopback()
            && !a.ip().is_unspecified()
        {
            return a.ip();
        }
    }
    panic!("no non-loopback IPv4 address found; set KOLE_TEST_SERVE_IP to this machine's address");
}

/// Points `v1alpha1.edge.kole.dev` at `port` on this machine (through a Service in `ns`) and waits
/// until the apiserver reports it Available.
pub async fn register(client: &Client, ns: &str, port: u16, ca_pem: &str) {
    let ip = external_ip();
    let svc = Service {
        metadata: ObjectMeta { name: Some(SERVICE.into()), ..Default::default() },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                port: 443,
                target_port: Some(IntOrString::Int(port.into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Service>::namespaced(client.clone(), ns).create(&PostParams::default(), &svc).await.unwrap();
    let ep = Endpoints {
        metadata: ObjectMeta { name: Some(SERVICE.into()), ..Default::default() },
        subsets: Some(vec![EndpointSubset {
            addresses: Some(vec![EndpointAddress { ip: ip.to_string(), ..Default::default() }]),
            ports: Some(vec![EndpointPort { port: port.into(), ..Default::default() }]),
            ..Default::default()
        }]),
    };
    Api::<Endpoints>::namespaced(client.clone(), ns).create(&PostParams::default(), &ep).await.unwrap();
    let apis: Api<APIService> = Api::all(client.clone());
    let _ = apis.delete(APISERVICE, &DeleteParams::default()).await;
    for _ in 0..100 {
        if apis.get_opt(APISERVICE).await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let obj = APIService {
        metadata: ObjectMeta { name: Some(APISERVICE.into()), ..Default::default() },
        spec: Some(APIServiceSpec {
            group: Some("edge.kole.dev".into()),
            version: Some("v1alpha1".into()),
            group_priority_minimum: 1000,
            version_priority: 15,
            service: Some(ServiceReference {
                namespace: Some(ns.to_owned()),
                name: Some(SERVICE.into()),
                port: Some(443),
            }),
            ca_bundle: Some(k8s_openapi::ByteString(ca_pem.as_bytes().to_vec())),
            insecure_skip_tls_verify: None,
        }),
        status: None,
    };
    apis.create(&PostParams::default(), &obj).await.unwrap();
    let mut last = String::new();
    for _ in 0..240 {
        let a = apis.get(APISERVICE).await.unwrap();
        let conds = a.status.and_then(|s| s.conditions).unwrap_or_default();
        if conds.iter().any(|c| c.type_ == "Available" && c.status == "True") {
            // Discovery through the aggregator lags availability by a moment.
            for _ in 0..100 {
                let req =
                    http::Request::get("/apis/edge.kole.dev/v1alpha1/edgenodes?limit=1").body(Vec::new()).unwrap();
                if client.request_text(req).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("the APIService is Available but edgenodes are not listable through the apiserver");
        }
        last = format!("{conds:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the APIService never became Available: {last}");
}

/// Removes the `APIService` (the namespace holding the Service goes with the test).
pub async fn unregister(client: &Client) {
    let _ = Api::<APIService>::all(client.clone()).delete(APISERVICE, &DeleteParams::default()).await;
}
