//! `deploy/kubernetes/`: each node's ConfigMap holds a config the node
//! accepts, whose templates the committed development policies approve,
//! and every file that config names lies under a volume the StatefulSet
//! mounts (read-only, but for the state). `.ci/run` also validates the
//! manifests against the Kubernetes schemas (kubernetes-validate).

use std::path::Path;

use cleanroom_node::config::{NodeConfig, Role, SourceKind};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The `node.toml: |` block of a ConfigMap, unindented.
fn node_toml(configmap: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in configmap.lines() {
        if inside {
            if let Some(l) = line.strip_prefix("    ") {
                out.push_str(l);
            } else if !line.is_empty() {
                break;
            }
            out.push('\n');
        } else if line.trim() == "node.toml: |" {
            inside = true;
        }
    }
    out
}

/// `mountPath:` values of a manifest, with whether the mount is read-only.
fn mounts(statefulset: &str) -> Vec<(String, bool)> {
    let lines: Vec<&str> = statefulset.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(p) = l.trim().strip_prefix("mountPath: ") {
            // The mount's other keys follow it until the next list item.
            let read_only = lines
                .iter()
                .skip(i + 1)
                .take_while(|n| !n.trim_start().starts_with("- "))
                .any(|n| n.trim() == "readOnly: true");
            out.push((p.to_string(), read_only));
        }
    }
    out
}

/// Every file a process of `cfg`'s node opens (`identity`, the CA, the
/// policy files, the shard key, the input) lies under a read-only mount of
/// `manifest`, and `state` (its state directory) under a writable one.
fn mounted(manifest: &str, identity: &[std::path::PathBuf], state: &Path, cfg: &NodeConfig, label: &str) {
    let m = mounts(manifest);
    let under = |p: &Path| {
        m.iter()
            .filter(|(dir, _)| p.starts_with(dir))
            .max_by_key(|(dir, _)| dir.len())
            .cloned()
    };
    let mut files = identity.to_vec();
    files.extend([
        cfg.identity.ca.clone(),
        cfg.policy.signed.clone(),
        cfg.policy.public_key.clone(),
        cfg.policy.peer_public_key.clone(),
        cfg.shards.key.clone().unwrap(),
    ]);
    match cfg.data.source {
        SourceKind::Postgres => {
            let pg = cfg.data.postgres.clone().unwrap();
            files.extend(pg.password_file);
            files.extend(pg.ca);
        }
        _ => files.push(cfg.data.path.clone()),
    }
    for f in &files {
        let (dir, read_only) = under(f).unwrap_or_else(|| panic!("{label}: {} is under no mount", f.display()));
        assert!(read_only, "{label}: {} is under a writable mount {dir}", f.display());
    }
    let (dir, read_only) = under(&state.join("state.db")).unwrap();
    assert!(!read_only, "{label}: the state ({dir}) must be writable");
}

#[test]
fn the_kubernetes_configs_are_accepted_and_their_files_are_mounted() {
    for (role, expected) in [("bank", Role::Bank), ("platform", Role::Platform)] {
        let manifests = root().join("deploy/kubernetes").join(role);
        let cm = std::fs::read_to_string(manifests.join("configmap.yaml")).unwrap();
        let sts = std::fs::read_to_string(manifests.join("statefulset.yaml")).unwrap();
        let svc = std::fs::read_to_string(manifests.join("service.yaml")).unwrap();
        let text = node_toml(&cm);
        let path = Path::new("/etc/cleanroom/node.toml");
        let cfg = NodeConfig::parse(&text, path).unwrap_or_else(|e| panic!("{role}: {e}"));
        assert_eq!(cfg.role, expected);
        assert!(cfg.shard_count() >= 2, "{role}: the manifests are for a sharded node");
        // Every template is approved by the committed development policy
        // (the examples' templates, which the operators signed).
        let policy = cleanroom_node::policy::load_verified(
            &root().join(format!("certs/{role}.policy")),
            &root().join(format!("certs/{role}-policy.pub")),
        )
        .unwrap();
        let templates = cfg.templates(path).unwrap();
        assert_eq!(templates.len(), 3);
        for t in &templates {
            assert!(policy.approves(t), "{role}: {} not approved", t.name);
        }
        // Every file the node opens is under a mount; only the state is writable.
        assert!(
            cfg.policy.key.is_none(),
            "{role}: no policy private key on a deployed node"
        );
        let identity = [cfg.identity.cert.clone(), cfg.identity.key.clone()];
        mounted(&sts, &identity, &cfg.state_dir, &cfg, role);
        // The container listens where the config does.
        let port = cfg.listen.port();
        assert!(sts.contains(&format!("containerPort: {port}")), "{role}");
        assert!(svc.contains(&format!("port: {port}")), "{role}");
        // The memory request covers twice the budget (the budget bounds
        // the shard cache at half of it; the rest is per-query state).
        let budget = cfg.memory_budget(path).unwrap();
        assert!(sts.contains("memory: 2Gi") && budget <= 1 << 30, "{role}");

        // The workers (workers.yaml): as many pods as the config lists,
        // each running `cleanroom worker` with its ordinal, listening where
        // the config says, with the files a worker opens mounted (its
        // certificate and key, the CA alone, the policy, the shard key, the
        // input) read-only and its state writable.
        let workers = std::fs::read_to_string(manifests.join("workers.yaml")).unwrap();
        let n = cfg.worker_count();
        assert!(n >= 2, "{role}: the manifests run workers");
        assert!(workers.contains(&format!("replicas: {n}")), "{role}");
        assert!(
            workers
                .contains(r#"args: ["worker", "--config", "/etc/cleanroom/node.toml", "--index", "$(WORKER_INDEX)"]"#),
            "{role}"
        );
        assert!(
            workers.contains("fieldPath: metadata.labels['apps.kubernetes.io/pod-index']"),
            "{role}"
        );
        let listen = cfg
            .workers
            .listen
            .unwrap_or_else(|| panic!("{role}: workers bind [workers] listen"));
        assert!(workers.contains(&format!("containerPort: {}", listen.port())), "{role}");
        assert!(workers.contains(&format!("port: {}", listen.port())), "{role}");
        for w in 0..n {
            // The coordinator and the peer reach worker w by the name the
            // headless Service gives it.
            let name = format!("cleanroom-{role}-worker-{w}.cleanroom-{role}-workers:{}", listen.port());
            assert!(text.contains(&name), "{role}: {name}");
            assert!(cfg.worker_listen(w).is_some(), "{role}");
        }
        let (cert, key) = cfg.worker_identity(0);
        mounted(
            &workers,
            &[cert, key],
            &cfg.worker_state_dir(0),
            &cfg,
            &format!("{role} worker"),
        );
        // The node's own key is not given to the workers: the identity
        // Secret is mounted with ca.pem alone.
        assert!(workers.contains("- key: ca.pem"), "{role}");
    }
    // The platform's workers reach the bank's, one each.
    let platform =
        node_toml(&std::fs::read_to_string(root().join("deploy/kubernetes/platform/configmap.yaml")).unwrap());
    let bank = node_toml(&std::fs::read_to_string(root().join("deploy/kubernetes/bank/configmap.yaml")).unwrap());
    let path = Path::new("/etc/cleanroom/node.toml");
    let (p, b) = (
        NodeConfig::parse(&platform, path).unwrap(),
        NodeConfig::parse(&bank, path).unwrap(),
    );
    assert_eq!(p.peer.workers.len() as u32, b.worker_count());
    let bank_workers = std::fs::read_to_string(root().join("deploy/kubernetes/bank/workers.yaml")).unwrap();
    for w in 0..b.worker_count() {
        assert!(bank_workers.contains(&format!(
            "statefulset.kubernetes.io/pod-name: cleanroom-bank-worker-{w}"
        )));
    }
}
