//! The CA, the store and the bundle on real files.

use std::{
    os::unix::fs::PermissionsExt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::{
    CaError, CertStore, LocalCa, SpiffeId, StoreOptions, TrustBundle, generate_ca_valid,
    init_dev_ca,
};

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).expect("identity")
}

#[test]
fn ca_init_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    let (cert, key) = init_dev_ca(&ca_dir, "cluster.local", 30, false).expect("init");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = std::fs::read(&cert).expect("cert");
    match init_dev_ca(&ca_dir, "cluster.local", 30, false) {
        Err(CaError::Exists { path }) => {
            assert!(path.ends_with("ca.crt") || path.ends_with("ca.key"))
        }
        other => panic!("overwrote: {:?}", other.map(|_| ())),
    }
    assert_eq!(std::fs::read(&cert).expect("cert"), before);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    init_dev_ca(&ca_dir, "cluster.local", 30, true).expect("forced");
    assert_ne!(std::fs::read(&cert).expect("cert"), before);
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "a forced overwrite tightens the key's permissions"
    );
    LocalCa::load_dir(&ca_dir).expect("loads");
    assert!(init_dev_ca(&ca_dir, "Bad Domain", 30, true).is_err());
}

#[test]
fn ca_load_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("ca.crt");
    let key = dir.path().join("ca.key");
    let message = |result: Result<LocalCa, CaError>| match result {
        Ok(_) => panic!("loaded"),
        Err(error) => error.to_string(),
    };
    let missing = message(LocalCa::load(&cert, &key));
    assert!(missing.contains("ca.crt"), "{missing}");

    std::fs::write(&cert, "garbage").expect("write");
    std::fs::write(&key, "garbage").expect("write");
    let garbage = message(LocalCa::load(&cert, &key));
    assert!(
        garbage.contains("ca.crt") && garbage.contains("no PEM certificate"),
        "{garbage}"
    );

    let now = SystemTime::now();
    let expired = generate_ca_valid(
        "cluster.local",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .expect("ca");
    std::fs::write(&cert, &expired.cert_pem).expect("write");
    std::fs::write(&key, &expired.key_pem).expect("write");
    let error = LocalCa::load(&cert, &key).err().expect("refused");
    assert!(matches!(error, CaError::Expired { .. }), "{error}");
    assert!(error.to_string().contains("ca.crt"), "{error}");

    let future = generate_ca_valid(
        "cluster.local",
        now + Duration::from_secs(3600),
        now + Duration::from_secs(7200),
    )
    .expect("ca");
    std::fs::write(&cert, &future.cert_pem).expect("write");
    std::fs::write(&key, &future.key_pem).expect("write");
    let error = LocalCa::load(&cert, &key).err().expect("refused");
    assert!(matches!(error, CaError::NotYetValid { .. }), "{error}");

    let good = super::generate_dev_ca("cluster.local", 1).expect("ca");
    std::fs::write(&cert, &good.cert_pem).expect("write");
    std::fs::write(&key, "not a key").expect("write");
    let bad_key = message(LocalCa::load(&cert, &key));
    assert!(bad_key.contains("ca.key"), "{bad_key}");

    std::fs::write(&key, &expired.key_pem).expect("write");
    let error = LocalCa::load(&cert, &key).err().expect("refused");
    assert!(matches!(error, CaError::KeyMismatch { .. }), "{error}");
}

/// A dev CA in a temp dir, its bundle, and a store issuing from it.
pub(crate) fn store_with(
    lifetime: Duration,
) -> (tempfile::TempDir, Arc<CertStore>, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _) = init_dev_ca(dir.path(), "cluster.local", 1, false).expect("init");
    let ca = LocalCa::load_dir(dir.path()).expect("load");
    let bundle = TrustBundle::from_pem_files(&[&cert]).expect("bundle");
    let store = CertStore::new(
        Arc::new(ca),
        bundle,
        StoreOptions {
            lifetime,
            ..StoreOptions::default()
        },
    );
    (dir, store, cert)
}

#[tokio::test]
async fn leaf_certificates_carry_the_identity_and_usages() {
    let (_dir, store, _) = store_with(Duration::from_secs(3600));
    let web = id("web");
    let info = store.ensure(&web).await.expect("issued");
    assert_eq!(info.identity, web);
    let lifetime = info
        .not_after
        .duration_since(info.not_before)
        .expect("window");
    assert!(lifetime <= Duration::from_secs(3600 + 60), "{lifetime:?}");
    let again = store.ensure(&web).await.expect("cached");
    assert_eq!(again.serial, info.serial);

    let key = store.certified_key(&web).expect("key");
    let (_, cert) = X509Certificate::from_der(key.cert[0].as_ref()).expect("parse");
    let usage = cert.key_usage().expect("ku").expect("present").value;
    assert!(usage.digital_signature() && !usage.key_cert_sign());
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!cert.is_ca());
    assert_eq!(
        cert.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );

    let rotated = store.rotate_now(&web).await.expect("rotated");
    assert_ne!(rotated.serial, info.serial);
    store.ensure(&id("db")).await.expect("issued");
    let listed: Vec<String> = store
        .list()
        .iter()
        .map(|i| i.identity.to_string())
        .collect();
    assert_eq!(
        listed,
        [
            "spiffe://cluster.local/ns/default/sa/db",
            "spiffe://cluster.local/ns/default/sa/web"
        ]
    );
    assert!(store.remove(&web));
    assert!(store.info(&web).is_none());
}

#[tokio::test]
async fn the_rotation_task_replaces_certificates_at_half_life() {
    let (_dir, store, _) = store_with(Duration::from_secs(3));
    let web = id("web");
    let first = store.ensure(&web).await.expect("issued");
    let task = store.spawn_rotation();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    loop {
        let now = store.info(&web).expect("info");
        if now.serial != first.serial {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not rotated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    task.abort();
}

#[test]
fn bundles_take_several_roots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = super::generate_dev_ca("one", 1).expect("ca");
    let two = super::generate_dev_ca("two", 1).expect("ca");
    let a = dir.path().join("a.pem");
    let b = dir.path().join("b.pem");
    std::fs::write(&a, &one.cert_pem).expect("write");
    std::fs::write(&b, format!("{}{}", two.cert_pem, one.cert_pem)).expect("write");
    let bundle = TrustBundle::from_pem_files(&[&a, &b]).expect("bundle");
    assert_eq!(bundle.roots().len(), 3);
    let merged = TrustBundle::from_pem(one.cert_pem.as_bytes())
        .expect("one")
        .merged(&TrustBundle::from_pem(two.cert_pem.as_bytes()).expect("two"));
    assert_eq!(merged.roots().len(), 2);
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let error = TrustBundle::from_pem_files(&[&empty]).expect_err("empty");
    assert!(error.to_string().contains("empty.pem"), "{error}");
}
