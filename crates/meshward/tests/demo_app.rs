//! `meshward demo-app`: what it answers, and calling another URL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::*;

fn demo_app(name: &str) -> (Spawned, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let process = spawn(
        "meshward demo-app",
        meshward().args(["demo-app", "--name", name, "--listen", &addr.to_string()]),
    );
    eventually_status(addr, "/", 200, START);
    (process, addr)
}

#[test]
fn the_demo_app_echoes_and_calls_on() {
    let (_a, a) = demo_app("a");
    let (_b, b) = demo_app("b");
    let (status, body) = http_get(a, "/headers?x=1").unwrap();
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (seen["name"].as_str(), seen["path"].as_str()),
        (Some("a"), Some("/headers?x=1"))
    );
    assert_eq!(seen["headers"]["host"], "admin");

    let (status, body) = http_get(a, &format!("/call?url=http://{b}/hello")).unwrap();
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["call"]["status"], 200);
    assert_eq!(seen["call"]["body"]["name"], "b");
    assert_eq!(seen["call"]["body"]["path"], "/hello");

    assert_eq!(http_get(a, "/status/418").unwrap().0, 418);
    let (status, body) = http_get(a, "/call?url=http://127.0.0.1:1/").unwrap();
    assert_eq!(status, 502, "{body}");
}
