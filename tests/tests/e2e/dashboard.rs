//! The demo page and the dashboard over plain HTTP: the pages are served, the
//! dashboard is off without an admin token, the token is traded for an `HttpOnly`
//! session cookie (never the token itself), and the event stream pushes snapshots to
//! that cookie or a bearer token, and to nobody else.

use std::net::SocketAddr;
use std::time::Duration;

use roomcast::config::Config;
use roomcast_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const TOKEN: &str = "dashboard-test-token";

fn head_and_body(response: &str) -> (&str, &str) {
    response.split_once("\r\n\r\n").unwrap_or((response, ""))
}

async fn post_login(addr: SocketAddr, token: &str, origin: Option<&str>) -> String {
    let body = format!("token={token}");
    let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
    let request = format!(
        "POST /dashboard/login HTTP/1.1\r\nHost: {addr}\r\n{origin}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw_request(addr, request.as_bytes()).await.unwrap()
}

/// Sign in and return the `name=value` of the session cookie.
async fn sign_in(addr: SocketAddr) -> String {
    let response = post_login(addr, TOKEN, Some(&format!("http://{addr}"))).await;
    let (head, _) = head_and_body(&response);
    assert_eq!(status_of(head), Some(303), "{response}");
    let cookie = header(head, "set-cookie").expect("a session cookie");
    cookie.split(';').next().unwrap().to_owned()
}

async fn get_with(addr: SocketAddr, path: &str, extra: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    raw_request(addr, request.as_bytes()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_are_served_and_the_dashboard_is_off_without_a_token() {
    let server = TestServer::start(test_config()).await;
    let response = get_with(server.addr, "/", "").await;
    let (head, body) = head_and_body(&response);
    assert_eq!(status_of(head), Some(200));
    assert!(header(head, "content-type").is_some_and(|v| v.starts_with("text/html")));
    assert!(header(head, "content-security-policy").is_some_and(|v| v.contains("script-src 'self'")));
    assert!(body.contains("/assets/demo.js") && body.contains("id=\"members\""), "{body}");
    for (path, kind) in [
        ("/assets/demo.js", "text/javascript"),
        ("/assets/dashboard.js", "text/javascript"),
        ("/assets/style.css", "text/css"),
        ("/roomcast.js", "text/javascript"),
    ] {
        let response = get_with(server.addr, path, "").await;
        assert_eq!(status_of(&response), Some(200), "{path}");
        assert!(header(head_and_body(&response).0, "content-type").is_some_and(|v| v.starts_with(kind)));
    }
    // The browser client is the package's file as it is.
    let client = get_with(server.addr, "/roomcast.js", "").await;
    assert_eq!(head_and_body(&client).1, include_str!("../../../clients/js/roomcast.js"));
    for path in ["/dashboard", "/dashboard/events"] {
        assert_eq!(status_of(&get_with(server.addr, path, "").await), Some(404), "{path}");
    }
    assert_eq!(status_of(&post_login(server.addr, "anything", None).await), Some(404));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_buys_an_http_only_cookie_that_carries_the_event_stream() {
    let server = TestServer::start(Config { admin_token: Some(TOKEN.into()), ..test_config() }).await;
    let addr = server.addr;

    // Without a session: the token form.
    let form = get_with(addr, "/dashboard", "").await;
    assert!(head_and_body(&form).1.contains("name=\"token\""), "{form}");
    assert_eq!(status_of(&get_with(addr, "/dashboard/events", "").await), Some(401));
    let wrong = post_login(addr, "wrong", None).await;
    assert_eq!(status_of(&wrong), Some(401));
    assert!(header(head_and_body(&wrong).0, "set-cookie").is_none());
    let cross_site = post_login(addr, TOKEN, Some("http://evil.example")).await;
    assert_eq!(status_of(&cross_site), Some(403), "a cross-site sign-in is refused");

    // The right token: a cookie with a random id, never the token.
    let response = post_login(addr, TOKEN, Some(&format!("http://{addr}"))).await;
    let set_cookie = header(head_and_body(&response).0, "set-cookie").unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains(TOKEN), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let id = cookie.split_once('=').unwrap().1;
    assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{cookie}");
    let other = sign_in(addr).await;
    assert_ne!(cookie, other, "every session gets its own id");

    let page = get_with(addr, "/dashboard", &format!("Cookie: {cookie}\r\n")).await;
    assert!(head_and_body(&page).1.contains("/assets/dashboard.js"), "{page}");

    // The stream shows the rooms and their members.
    let mut ada = server.connect("chat:lobby?name=ada").await;
    send_text(&mut ada, "hello").await;
    server.wait_metric("roomcast_messages_in_total", 1.0, Duration::from_secs(5)).await;
    let events = snapshots(addr, &format!("Cookie: {cookie}\r\n"), 2).await;
    let (first, second) = (&events[0].1, &events[1].1);
    assert_eq!(first["connections"], 1);
    let room = &first["rooms"][0];
    assert_eq!(
        (room["name"].as_str(), room["member_count"].as_u64()),
        (Some("chat:lobby"), Some(1)),
        "{first}"
    );
    assert_eq!(room["members"][0]["name"], "ada");
    assert_eq!(first["messages_in_total"], 1);
    for key in ["plugins", "reloads"] {
        assert!(first[key].is_array(), "{key} in {first}");
    }
    assert_eq!(first["rejected"]["timeout"], 0);
    assert_eq!(first["closed"]["client"], 0);
    let gap = events[1].0 - events[0].0;
    assert!(
        gap >= Duration::from_millis(800) && gap <= Duration::from_millis(2500),
        "pushed every second: {gap:?}"
    );
    assert!(second["at"].is_string());

    // A bearer token works too (for tools); signing out ends the cookie's session.
    snapshots(addr, &format!("Authorization: Bearer {TOKEN}\r\n"), 1).await;
    let out = raw_request(
        addr,
        format!("POST /dashboard/logout HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    assert!(header(head_and_body(&out).0, "set-cookie").is_some_and(|c| c.contains("Max-Age=0")), "{out}");
    let refused = get_with(addr, "/dashboard/events", &format!("Cookie: {cookie}\r\n")).await;
    assert_eq!(status_of(&refused), Some(401));
    snapshots(addr, &format!("Cookie: {other}\r\n"), 1).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_event_stream_does_not_hold_up_shutdown() {
    let server = TestServer::start(Config { admin_token: Some(TOKEN.into()), ..test_config() }).await;
    let addr = server.addr;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET /dashboard/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    assert!(stream.read(&mut buf).await.unwrap() > 0);
    let started = tokio::time::Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(3), "stop took {:?}", started.elapsed());
    // The stream ends rather than hanging.
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the event stream ended with the server");
}
