//! The CA in Kubernetes mode end to end, but for the API server (a mock): real TLS without a
//! client certificate, the agent's client sending its token file, TokenReviews, the pod watch.

use std::{path::Path, sync::Arc, time::Duration};

use http::StatusCode;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use serde_json::json;

use super::{
    Limits, Mode, RunningCa, ServeOptions,
    kube_mock::{Reply, WatchFeed, client, pod, pod_list},
    start_with,
    token::TokenOptions,
};
use crate::tls::{
    CaError, CertStore, NodeCredential, RemoteSigner, RemoteSignerOptions, Signer, SpiffeId,
    StoreOptions, TrustBundle, init_dev_ca,
};

const TD: &str = "cluster.local";

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "shop", sa).expect("identity")
}

fn spki() -> Vec<u8> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .expect("key")
        .subject_public_key_info()
}

/// The mock API server: tokens `tok-a`/`tok-b` are the agents of node-a/node-b (the node
/// named in the token); any other token is refused. Pods: `api` on node-a, `db` on node-b,
/// listed when the test calls the returned function.
fn api_server() -> (kube::Client, impl FnOnce()) {
    let (list_feed, list_body) = WatchFeed::new();
    let (watch_feed, watch_body) = WatchFeed::new();
    let mut bodies = (Some(list_body), Some(watch_body));
    let (client, _) = client(move |seen| {
        if seen
            .uri
            .starts_with("/apis/authentication.k8s.io/v1/tokenreviews")
        {
            let node = match seen.body["spec"]["token"].as_str() {
                Some("tok-a") => "node-a",
                Some("tok-b") => "node-b",
                _ => {
                    let status = json!({"authenticated": false, "error": "invalid bearer token"});
                    return Reply::Json(StatusCode::CREATED, json!({"status": status}));
                }
            };
            let status = json!({
                "authenticated": true,
                "audiences": ["mesh-ca"],
                "user": {
                    "username": "system:serviceaccount:mesh-system:mesh-agent",
                    "extra": {"authentication.kubernetes.io/node-name": [node]},
                },
            });
            return Reply::Json(StatusCode::CREATED, json!({"status": status}));
        }
        let body = if seen.is_watch() {
            bodies.1.take()
        } else {
            bodies.0.take()
        };
        body.unwrap_or_else(|| {
            // A resumed watch or a relist: nothing new, kept open.
            let (feed, body) = WatchFeed::new();
            std::mem::forget(feed);
            body
        })
    });
    let release = move || {
        let list = pod_list(
            "100",
            vec![
                pod(
                    "shop",
                    "api-1",
                    "u-1",
                    Some("node-a"),
                    Some("api"),
                    "Running",
                ),
                pod("shop", "db-1", "u-2", Some("node-b"), Some("db"), "Running"),
            ],
        );
        list_feed.send_raw(&list.to_string());
        drop(list_feed);
        // The watch stays open, with nothing to say.
        std::mem::forget(watch_feed);
    };
    (client, release)
}

async fn start(dir: &Path, client: kube::Client) -> RunningCa {
    let options = ServeOptions {
        ca_dir: dir.join("ca"),
        mode: Mode::Kubernetes {
            trust_domain: TD.into(),
            token: TokenOptions::default(),
        },
        listen: "127.0.0.1:0".parse().expect("addr"),
        limits: Limits::default(),
    };
    start_with(options, Some(client)).await.expect("CA starts")
}

fn agent(dir: &Path, ca: &RunningCa, token_file: &Path) -> Arc<RemoteSigner> {
    Arc::new(
        RemoteSigner::new(RemoteSignerOptions {
            address: ca.addr.to_string(),
            trust_domain: TD.into(),
            node: "ignored-with-a-token".into(),
            credential: NodeCredential::Token {
                file: token_file.to_owned(),
            },
            bundle: TrustBundle::from_pem_files(&[dir.join("ca/ca.crt")]).expect("bundle"),
            request_timeout: Duration::from_secs(5),
        })
        .expect("client"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_its_token_gets_its_own_pods_identities_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_dev_ca(&dir.path().join("ca"), TD, 30, false).expect("CA");
    let (client, release) = api_server();
    let ca = start(dir.path(), client).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "tok-a\n").expect("token");
    let node_a = agent(dir.path(), &ca, &token_file);

    // Authenticated, but the CA has no list of pods yet: busy, not refused.
    match node_a
        .sign(&id("api"), &spki(), Duration::from_secs(600))
        .await
    {
        Err(CaError::Unavailable(reason)) => assert!(reason.contains("503"), "{reason}"),
        other => panic!("before the first list: {:?}", other.map(|c| c.len())),
    }
    release();
    let store = CertStore::new(
        node_a.clone(),
        TrustBundle::from_pem_files(&[dir.path().join("ca/ca.crt")]).expect("bundle"),
        StoreOptions::default(),
    );
    let mut issued = None;
    for _ in 0..50 {
        match store.ensure(&id("api")).await {
            Ok(info) => {
                issued = Some(info);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(issued.expect("api is on node-a").identity, id("api"));
    match node_a
        .sign(&id("db"), &spki(), Duration::from_secs(600))
        .await
    {
        Err(CaError::Refused(reason)) => {
            assert!(
                reason.contains("403") && reason.contains("node-a"),
                "{reason}"
            );
        }
        other => panic!("db runs on node-b: {:?}", other.map(|c| c.len())),
    }

    // The token file is read for every request: the kubelet's rotation is picked up, and a
    // token that is not an agent's is refused before anything is looked at.
    std::fs::write(&token_file, "tok-b").expect("token");
    node_a
        .sign(&id("db"), &spki(), Duration::from_secs(600))
        .await
        .expect("now node-b's token: db is on node-b");
    std::fs::write(&token_file, "forged").expect("token");
    match node_a
        .sign(&id("db"), &spki(), Duration::from_secs(600))
        .await
    {
        Err(CaError::Refused(reason)) => assert!(reason.contains("401"), "{reason}"),
        other => panic!("a forged token: {:?}", other.map(|c| c.len())),
    }
    let health = node_a.check().await;
    assert!(health.is_err(), "even the health check needs a valid token");
}

/// kube's TLS client builds on the one crypto provider of the binary (ring; no aws-lc): a
/// second provider, or none, would fail or panic here rather than in a cluster.
#[tokio::test]
async fn the_kube_client_builds_with_tls() {
    let config = kube::Config::new("https://127.0.0.1:6443".parse().expect("url"));
    kube::Client::try_from(config).expect("a TLS kube client");
}

/// `GET /v1/health` over TLS with `config` (which presents no client certificate), no token.
async fn health_without_credentials(
    ca: &RunningCa,
    config: Arc<rustls::ClientConfig>,
) -> Result<StatusCode, String> {
    let tcp = tokio::net::TcpStream::connect(ca.addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("mesh-ca").map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::get(crate::tls::ca_api::HEALTH_PATH)
        .header(http::header::HOST, "mesh-ca")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.status())
}

/// In Kubernetes the TLS takes a client without a certificate, and the request without a
/// token is refused; locally the same client does not get past the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_certificate_and_no_token_is_refused_in_both_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_dev_ca(&dir.path().join("ca"), TD, 30, false).expect("CA");
    let bundle = TrustBundle::from_pem_files(&[dir.path().join("ca/ca.crt")]).expect("bundle");
    let anonymous =
        crate::tls::ca_client_config(bundle, crate::tls::ControlId::ca(TD).expect("id"), None)
            .expect("client config");

    let (client, _release) = api_server();
    let kubernetes = start(dir.path(), client).await;
    assert_eq!(
        health_without_credentials(&kubernetes, anonymous.clone()).await,
        Ok(StatusCode::UNAUTHORIZED)
    );

    let config = dir.path().join("mesh.yaml");
    std::fs::write(&config, "agent: {node: ca-host}\nworkloads: []\n").expect("config");
    let local = start_with(
        ServeOptions {
            ca_dir: dir.path().join("ca"),
            mode: Mode::Local {
                config,
                trust_roots: Vec::new(),
            },
            listen: "127.0.0.1:0".parse().expect("addr"),
            limits: Limits::default(),
        },
        None,
    )
    .await
    .expect("local CA");
    let refused = health_without_credentials(&local, anonymous).await;
    assert!(refused.is_err(), "no node certificate: {refused:?}");
}
