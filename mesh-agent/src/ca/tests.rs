//! The CA and its client over loopback: real TLS, real HTTP, real files.

use std::{
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, StatusCode};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Limits, Mode, RunningCa, ServeOptions, issue_node, start};
use crate::tls::{
    Answer, CaError, CertStore, ControlId, LocalCa, NodeCredential, RemoteSigner,
    RemoteSignerOptions, Signer, SpiffeId, StoreOptions, TrustBundle, ca_api, init_dev_ca,
    init_intermediate_ca, pem_certificate,
};

const TD: &str = "cluster.local";

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "shop", sa).expect("identity")
}

/// `api` on node n1 (and n2), `db` on n2.
fn mesh_yaml(api_nodes: &[&str]) -> String {
    let mut yaml = String::from("agent: {node: ca-host}\nworkloads:\n");
    for (i, node) in api_nodes.iter().enumerate() {
        yaml.push_str(&format!(
            "- {{name: api-{i}, namespace: shop, serviceAccount: api, ips: [10.0.0.{}], node: {node}}}\n",
            i + 1
        ));
    }
    yaml.push_str("- {name: db, namespace: shop, serviceAccount: db, ips: [10.0.1.1], node: n2}\n");
    yaml
}

struct Setup {
    dir: tempfile::TempDir,
    root: PathBuf,
    ca: PathBuf,
    config: PathBuf,
}

/// A root, an intermediate under it (the CA's key), the mesh config.
fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let ca = dir.path().join("intermediate");
    init_dev_ca(&root, TD, 30, false).expect("root");
    init_intermediate_ca(&root, &ca, TD, 30, false).expect("intermediate");
    let config = dir.path().join("mesh.yaml");
    std::fs::write(&config, mesh_yaml(&["n1"])).expect("config");
    Setup {
        dir,
        root,
        ca,
        config,
    }
}

async fn start_ca(setup: &Setup, limits: Limits) -> RunningCa {
    start(ServeOptions {
        ca_dir: setup.ca.clone(),
        mode: Mode::Local {
            config: setup.config.clone(),
            trust_roots: Vec::new(),
        },
        listen: "127.0.0.1:0".parse().expect("addr"),
        limits,
    })
    .await
    .expect("CA starts")
}

fn bundle(setup: &Setup) -> TrustBundle {
    TrustBundle::from_pem_files(&[setup.root.join("ca.crt")]).expect("bundle")
}

fn client(setup: &Setup, ca: &RunningCa, node: &str, node_dir: &Path) -> RemoteSigner {
    RemoteSigner::new(RemoteSignerOptions {
        address: ca.addr.to_string(),
        trust_domain: TD.into(),
        node: node.into(),
        credential: NodeCredential::Certificate {
            cert_file: node_dir.join("node.crt"),
            key_file: node_dir.join("node.key"),
        },
        bundle: bundle(setup),
        request_timeout: Duration::from_secs(5),
    })
    .expect("client")
}

fn node_client(setup: &Setup, ca: &RunningCa, node: &str) -> RemoteSigner {
    let out = setup.dir.path().join(node);
    issue_node(&setup.ca, TD, node, 1, &out, true).expect("node certificate");
    client(setup, ca, node, &out)
}

/// An oversize request is refused: answered `413`, or, when the CA closes the connection
/// before the client has written its whole body (a race the client can lose), the write fails
/// with the connection closed under it. Never anything else.
fn refused_as_too_large(result: Result<Answer, CaError>) -> bool {
    match result {
        Ok((status, _)) => status == StatusCode::PAYLOAD_TOO_LARGE,
        Err(CaError::Unavailable(reason)) => {
            reason.contains("Broken pipe") || reason.contains("reset by peer")
        }
        Err(_) => false,
    }
}

fn spki() -> Vec<u8> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .expect("key")
        .subject_public_key_info()
}

#[tokio::test]
async fn a_node_gets_the_identities_placed_on_it_and_no_other() {
    let setup = setup();
    let ca = start_ca(&setup, Limits::default()).await;
    let n1 = Arc::new(node_client(&setup, &ca, "n1"));
    // Through the certificate store, as the agent does: the chain verifies to the root.
    let store = CertStore::new(n1.clone(), bundle(&setup), StoreOptions::default());
    let info = store.ensure(&id("api")).await.expect("api is placed on n1");
    assert_eq!(info.identity, id("api"));
    let chain = n1
        .sign(&id("api"), &spki(), Duration::from_secs(600))
        .await
        .expect("chain");
    assert_eq!(chain.len(), 3, "leaf, intermediate, root (as in ca.crt)");
    let intermediate = LocalCa::load_dir(&setup.ca).expect("intermediate");
    assert_eq!(chain[1], intermediate.chain()[0]);

    match n1.sign(&id("db"), &spki(), Duration::from_secs(600)).await {
        Err(CaError::Refused(reason)) => {
            assert!(
                reason.contains("403") && reason.contains("node n1"),
                "{reason}"
            )
        }
        other => panic!("db is on n2 only: {:?}", other.map(|c| c.len())),
    }
    let other_domain = SpiffeId::new("other.td", "shop", "api").expect("id");
    assert!(matches!(
        n1.sign(&other_domain, &spki(), Duration::from_secs(600))
            .await,
        Err(CaError::Refused(_))
    ));
    let health = n1.health();
    assert_eq!(health.reachable, Some(true));
    assert_eq!((health.issued, health.refused), (2, 2));
}

#[tokio::test]
async fn a_moved_pod_is_issued_to_its_new_node_only() {
    let setup = setup();
    let ca = start_ca(&setup, Limits::default()).await;
    let n1 = node_client(&setup, &ca, "n1");
    let n2 = node_client(&setup, &ca, "n2");
    let lifetime = Duration::from_secs(600);
    assert!(n1.sign(&id("api"), &spki(), lifetime).await.is_ok());
    assert!(n2.sign(&id("api"), &spki(), lifetime).await.is_err());
    std::fs::write(&setup.config, mesh_yaml(&["n2"])).expect("move api to n2");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while n2.sign(&id("api"), &spki(), lifetime).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the CA reloads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        n1.sign(&id("api"), &spki(), lifetime).await,
        Err(CaError::Refused(_))
    ));
}

#[tokio::test]
async fn node_certificates_of_another_ca_expired_or_of_a_workload_are_refused() {
    let setup = setup();
    let ca = start_ca(&setup, Limits::default()).await;
    let lifetime = Duration::from_secs(600);
    let write_node =
        |name: &str, chain: Vec<rustls::pki_types::CertificateDer<'static>>, key: &KeyPair| {
            let out = setup.dir.path().join(name);
            std::fs::create_dir_all(&out).expect("dir");
            let pem: String = chain.iter().map(pem_certificate).collect();
            std::fs::write(out.join("node.crt"), pem).expect("cert");
            std::fs::write(out.join("node.key"), key.serialize_pem()).expect("key");
            out
        };
    let n1 = ControlId::node(TD, "n1").expect("id");

    // Another CA (same trust domain, same node name).
    let other = setup.dir.path().join("other");
    init_dev_ca(&other, TD, 30, false).expect("other CA");
    let other = LocalCa::load_dir(&other).expect("other CA");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let chain = other
        .sign_control_now(&n1, &key.subject_public_key_info(), lifetime)
        .expect("sign");
    let client_of_other = client(&setup, &ca, "n1", &write_node("other-n1", chain, &key));

    // Expired, from the right CA.
    let right = LocalCa::load_dir(&setup.ca).expect("CA");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let past = SystemTime::now() - Duration::from_secs(7200);
    let chain = right
        .sign_control_valid(
            &n1,
            &key.subject_public_key_info(),
            past,
            past + Duration::from_secs(60),
        )
        .expect("sign");
    let expired = client(&setup, &ca, "n1", &write_node("expired-n1", chain, &key));

    for (what, client) in [("another CA", client_of_other), ("expired", expired)] {
        match client.sign(&id("api"), &spki(), lifetime).await {
            Err(CaError::Unavailable(reason)) => {
                assert!(reason.contains("alert"), "{what}: {reason}")
            }
            other => panic!("{what}: {:?}", other.map(|c| c.len())),
        }
        assert_eq!(client.health().reachable, Some(false), "{what}");
    }

    // A workload certificate (which a node holds the key of) is not a node certificate.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let chain = right
        .sign_now(&id("api"), &key.subject_public_key_info(), lifetime)
        .expect("sign");
    let out = write_node("workload", chain, &key);
    assert!(
        RemoteSigner::new(RemoteSignerOptions {
            address: ca.addr.to_string(),
            trust_domain: TD.into(),
            node: "n1".into(),
            credential: NodeCredential::Certificate {
                cert_file: out.join("node.crt"),
                key_file: out.join("node.key"),
            },
            bundle: bundle(&setup),
            request_timeout: Duration::from_secs(5),
        })
        .is_err(),
        "the client refuses to present it"
    );
}

#[tokio::test]
async fn garbage_oversize_and_a_flood_from_one_node_do_not_starve_another() {
    let setup = setup();
    let limits = Limits {
        per_node_rate: NonZeroU32::new(5).expect("5"),
        per_node_burst: NonZeroU32::new(5).expect("5"),
        // Both nodes are 127.0.0.1 here: the per-address handshake cap is not what is tested.
        max_handshakes_per_peer: 64,
        ..Limits::default()
    };
    let ca = start_ca(&setup, limits).await;
    // Garbage and a silent client.
    let mut garbage = tokio::net::TcpStream::connect(ca.addr)
        .await
        .expect("connect");
    garbage.write_all(&[0x42; 4096]).await.expect("write");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), garbage.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "garbage gets closed"
    );
    let _silent = tokio::net::TcpStream::connect(ca.addr)
        .await
        .expect("connect");

    let n1 = node_client(&setup, &ca, "n1");
    let n2 = node_client(&setup, &ca, "n2");
    for size in [20 << 10, 1 << 20] {
        let oversize = Bytes::from(vec![b'{'; size]);
        let result = n1.exchange(Method::POST, ca_api::SIGN_PATH, oversize).await;
        assert!(refused_as_too_large(result), "{size} bytes");
    }
    let (status, _) = n1
        .exchange(
            Method::POST,
            ca_api::SIGN_PATH,
            Bytes::from_static(b"not json"),
        )
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // n1 floods: past its burst it gets 429s; n2 is served meanwhile.
    let n1 = Arc::new(n1);
    let flood: Vec<_> = (0..8)
        .map(|_| {
            let n1 = n1.clone();
            tokio::spawn(async move {
                let mut limited = 0;
                for _ in 0..10 {
                    let (status, _) = n1
                        .exchange(Method::POST, ca_api::SIGN_PATH, Bytes::from_static(b"{}"))
                        .await
                        .expect("answered");
                    limited += usize::from(status == StatusCode::TOO_MANY_REQUESTS);
                }
                limited
            })
        })
        .collect();
    let served = n2
        .sign(&id("db"), &spki(), Duration::from_secs(600))
        .await
        .expect("n2 is served during n1's flood");
    assert!(!served.is_empty());
    let mut limited = 0;
    for task in flood {
        limited += task.await.expect("flood task");
    }
    assert!(
        limited >= 60,
        "n1 was held to its rate: {limited} of 80 limited"
    );
}

#[tokio::test]
async fn with_the_ca_gone_a_rotation_fails_and_the_current_certificate_stays() {
    let setup = setup();
    let ca = start_ca(&setup, Limits::default()).await;
    let n1 = Arc::new(node_client(&setup, &ca, "n1"));
    let store = CertStore::new(n1.clone(), bundle(&setup), StoreOptions::default());
    let before = store.ensure(&id("api")).await.expect("issued");
    drop(ca);
    match store.rotate_now(&id("api")).await {
        Err(crate::tls::StoreError::Ca(CaError::Unavailable(_))) => {}
        other => panic!("rotated without a CA: {:?}", other.map(|i| i.serial)),
    }
    assert_eq!(
        store.info(&id("api")),
        Some(before),
        "the current certificate stays"
    );
    let health = n1.health();
    assert_eq!(health.reachable, Some(false));
    assert_eq!(health.unavailable, 1, "one try: the CA is gone, not busy");
    // A moment later, requests fail at once without trying (no connect per request).
    let started = tokio::time::Instant::now();
    match n1.sign(&id("api"), &spki(), Duration::from_secs(600)).await {
        Err(CaError::Unavailable(reason)) => assert!(reason.starts_with("not tried"), "{reason}"),
        other => panic!("signed without a CA: {:?}", other.map(|c| c.len())),
    }
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(n1.health().unavailable, 2);
    assert!(n1.check().await.is_err());
}

#[tokio::test]
async fn root_rotation_old_node_certificates_and_a_new_ca_root_both_verify() {
    // Old root (its intermediate issued node n1's certificate) and a new root whose
    // intermediate is the CA now; nodes trust both roots, the CA both for node certificates.
    let old = setup();
    let new = setup();
    let old_node = old.dir.path().join("n1");
    issue_node(&old.ca, TD, "n1", 1, &old_node, true).expect("old node certificate");
    let both = TrustBundle::from_pem_files(&[old.root.join("ca.crt"), new.root.join("ca.crt")])
        .expect("bundle");
    let client_for = |ca: &RunningCa, bundle: TrustBundle| {
        RemoteSigner::new(RemoteSignerOptions {
            address: ca.addr.to_string(),
            trust_domain: TD.into(),
            node: "n1".into(),
            credential: NodeCredential::Certificate {
                cert_file: old_node.join("node.crt"),
                key_file: old_node.join("node.key"),
            },
            bundle,
            request_timeout: Duration::from_secs(5),
        })
        .expect("client")
    };
    let rotating = start(ServeOptions {
        ca_dir: new.ca.clone(),
        mode: Mode::Local {
            config: new.config.clone(),
            trust_roots: vec![old.root.join("ca.crt")],
        },
        listen: "127.0.0.1:0".parse().expect("addr"),
        limits: Limits::default(),
    })
    .await
    .expect("CA with the new root");
    let client = client_for(&rotating, both.clone());
    let chain = client
        .sign(&id("api"), &spki(), Duration::from_secs(600))
        .await
        .expect("an old node certificate and a new CA root");
    let store = CertStore::new(Arc::new(client), both, StoreOptions::default());
    assert!(store.ensure(&id("api")).await.is_ok());
    assert_eq!(chain.len(), 3);

    // Without the old root on the CA, or the new one on the node, the handshake fails.
    let strict = start_ca(&new, Limits::default()).await;
    let old_only = TrustBundle::from_pem_files(&[old.root.join("ca.crt")]).expect("bundle");
    for (what, client) in [
        (
            "the CA does not trust the old root",
            client_for(&strict, bundle(&new).merged(&old_only)),
        ),
        (
            "the node does not trust the new root",
            client_for(&rotating, old_only.clone()),
        ),
    ] {
        assert!(
            matches!(
                client
                    .sign(&id("api"), &spki(), Duration::from_secs(600))
                    .await,
                Err(CaError::Unavailable(_))
            ),
            "{what}"
        );
    }
}

#[tokio::test]
async fn slow_clients_are_cut_off_at_the_timeouts() {
    let setup = setup();
    let limits = Limits {
        handshake_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let ca = start_ca(&setup, limits).await;
    let node_dir = setup.dir.path().join("n1");
    issue_node(&setup.ca, TD, "n1", 1, &node_dir, true).expect("node certificate");
    let (chain, key) =
        crate::tls::load_node_identity(&node_dir.join("node.crt"), &node_dir.join("node.key"))
            .expect("node identity");
    let config = crate::tls::ca_client_config(
        bundle(&setup),
        ControlId::ca(TD).expect("id"),
        Some((chain, key)),
    )
    .expect("client config");
    let connector = tokio_rustls::TlsConnector::from(config);
    let closed_within =
        |what: &'static str, mut stream: Box<dyn tokio::io::AsyncRead + Unpin + Send>| async move {
            let started = tokio::time::Instant::now();
            let mut buf = [0u8; 1024];
            loop {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => continue,
                    Err(_) => panic!("{what}: still open after 5 s"),
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{what}: {:?}",
                started.elapsed()
            );
        };
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(ca.addr)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("mesh-ca").expect("name");
        connector.connect(name, tcp).await.expect("handshake")
    };

    // Says nothing after connecting: the handshake times out.
    let silent = tokio::net::TcpStream::connect(ca.addr)
        .await
        .expect("connect");
    closed_within("no handshake", Box::new(silent)).await;
    // Half a request line, then nothing.
    let mut slow_headers = connect().await;
    slow_headers
        .write_all(b"POST /v1/sign HTTP/1.1\r\nho")
        .await
        .expect("write");
    closed_within("slow headers", Box::new(slow_headers)).await;
    // Headers announcing a body that never comes.
    let mut slow_body = connect().await;
    slow_body
        .write_all(b"POST /v1/sign HTTP/1.1\r\nhost: mesh-ca\r\ncontent-length: 100\r\n\r\n{")
        .await
        .expect("write");
    closed_within("slow body", Box::new(slow_body)).await;
    // The CA still serves.
    let n1 = client(&setup, &ca, "n1", &node_dir);
    assert!(
        n1.sign(&id("api"), &spki(), Duration::from_secs(600))
            .await
            .is_ok()
    );
}
