//! Discovery-driven behaviour: balancing over endpoints, config changes, a dead control plane,
//! and destinations outside the mesh.

use std::time::Duration;

use strait_e2e::{metric, served_by, Mesh, ServiceDef};

fn requests(mesh: &Mesh, pod: &strait_testbed::Pod, n: usize) -> anyhow::Result<String> {
    let urls: Vec<&str> = std::iter::repeat_n("http://10.96.0.10/", n).collect();
    mesh.curl(pod, &urls)
}

#[test]
fn three_endpoints_share_load_and_a_removed_one_stops_receiving_within_2s() -> anyhow::Result<()> {
    let mesh = Mesh::new("balance")?;
    let mut pods = Vec::new();
    for name in ["s1", "s2", "s3"] {
        let pod = mesh.meshed_pod(name)?;
        mesh.net.start_app(
            &pod,
            "app",
            &["http", "--listen", "0.0.0.0:8080", "--name", name],
        )?;
        pods.push(pod);
    }
    let all: Vec<_> = pods.iter().collect();
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &all))?;
    let client = mesh.meshed_pod("client")?;

    let counts = served_by(&requests(&mesh, &client, 150)?);
    assert_eq!(counts.values().sum::<usize>(), 150, "{counts:?}");
    for name in ["s1", "s2", "s3"] {
        assert!(
            counts.get(name).copied().unwrap_or(0) >= 8,
            "{name} got too little: {counts:?}"
        );
    }

    // Remove s3 from the config: it must stop receiving traffic within 2 s.
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &all[..2]))?;
    let took = mesh.eventually(Duration::from_secs(2), || {
        Ok(!served_by(&requests(&mesh, &client, 10)?).contains_key("s3"))
    })?;
    eprintln!("s3 stopped receiving traffic {took:?} after the config change");
    let counts = served_by(&requests(&mesh, &client, 60)?);
    assert!(!counts.contains_key("s3"), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 60);
    Ok(())
}

#[test]
fn traffic_keeps_flowing_when_the_control_plane_dies_and_streams_reconnect() -> anyhow::Result<()> {
    let mesh = Mesh::new("cpdead")?;
    let server = mesh.meshed_pod("server")?;
    mesh.net.start_app(
        &server,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
    )?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let client = mesh.meshed_pod("client")?;
    assert_eq!(
        served_by(&requests(&mesh, &client, 5)?).get("server"),
        Some(&5)
    );

    mesh.net
        .kill(&mesh.control_plane, nix::sys::signal::Signal::SIGKILL)?;
    // New connections and requests to the known destination keep working from the last state.
    for _ in 0..10 {
        assert_eq!(
            served_by(&requests(&mesh, &client, 3)?).get("server"),
            Some(&3)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(&m, "strait_discovery_connected", &[]),
        Some(0.0),
        "stream is down: {m}"
    );

    // A new control plane: the proxy reconnects by itself and sees changes again.
    let _cp = mesh.net.start_control_plane(&mesh.config.dir)?;
    mesh.eventually(Duration::from_secs(10), || {
        Ok(metric(&mesh.metrics(&client)?, "strait_discovery_connected", &[]) == Some(1.0))
    })?;
    assert_eq!(
        served_by(&requests(&mesh, &client, 5)?).get("server"),
        Some(&5)
    );
    Ok(())
}

#[test]
fn a_destination_outside_the_mesh_is_reached_through_passthrough() -> anyhow::Result<()> {
    let mesh = Mesh::new("passthru")?;
    // A plain pod: no sidecar, not in the config.
    let outside = mesh.net.pod("outside")?;
    mesh.net.start_app(
        &outside,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "outside"],
    )?;
    let client = mesh.meshed_pod("client")?;
    let out = mesh.curl(&client, &[&format!("http://{}:8080/", outside.ip)])?;
    assert_eq!(out.trim(), "hello from outside");
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(
            &m,
            "strait_request_total",
            &["direction=\"outbound\"", "target=\"passthrough\""]
        ),
        Some(1.0),
        "{m}"
    );
    Ok(())
}
