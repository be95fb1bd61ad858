//! A real browser against a real server: headless Chromium, driven over WebDriver,
//! uses the chat demo page and the dashboard as a person would. Two pages chat with
//! each other; a plugin swap shows on the dashboard; a cluster node's dashboard shows
//! a room spread over two nodes; the page survives a server restart by reconnecting;
//! two pages each in two rooms on one connection keep each room's messages apart and
//! re-join both after a restart; a page that lost its connection shows what it missed
//! (or says it could not); the README's snippets run as written; with compression on,
//! Chromium negotiates `permessage-deflate` and the demo and the dashboard work, long
//! lines going compressed both ways. Screenshots land in `target/screenshots/`.

use std::path::Path;
use std::time::Duration;

use roomcast::config::Config;
use roomcast_tests::browser::{Browser, Driver, screenshot_path};
use roomcast_tests::*;
use serde_json::{Value, json};

const TOKEN: &str = "browser-test-token";
const WAIT: Duration = Duration::from_secs(15);

/// Chromium is heavy for two cores: one browser test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(dir: &PluginDir) -> Config {
    Config {
        plugins: Some(dir.path.clone()),
        plugin_cache: None,
        admin_token: Some(TOKEN.into()),
        ..test_config()
    }
}

/// Open the demo page and join `chat:ROOM` as `name`.
async fn join(browser: &Browser, server: std::net::SocketAddr, name: &str, room: &str) -> anyhow::Result<()> {
    browser.goto(&format!("http://{server}/")).await?;
    browser.type_into("#name", name).await?;
    browser.type_into("#room", room).await?;
    browser.click("#join").await?;
    wait_connected(browser, name).await
}

async fn wait_connected(browser: &Browser, who: &str) -> anyhow::Result<()> {
    let script = "return document.getElementById('status').dataset.state === 'connected'";
    browser.wait_for(&format!("{who}'s page is connected"), script, json!([]), WAIT).await.map(drop)
}

/// Wait until the page's member list holds exactly `expected` (sorted names, comma-separated).
async fn wait_members(browser: &Browser, who: &str, expected: &str) -> anyhow::Result<()> {
    let script = "return [...document.querySelectorAll('#members .member')].map(b => b.dataset.name).sort().join(',') \
                  === arguments[0]";
    browser
        .wait_for(&format!("{who} sees members {expected}"), script, json!([expected]), WAIT)
        .await
        .map(drop)
}

/// Wait for a message line of `class` whose author and text contain the given parts.
async fn wait_line(
    browser: &Browser,
    who: &str,
    class: &str,
    author: &str,
    text: &str,
) -> anyhow::Result<()> {
    let script = "return [...document.querySelectorAll('#log li')].some(li => \
                  li.matches(arguments[0]) && (li.querySelector('.who')?.textContent ?? '').includes(arguments[1]) \
                  && li.querySelector('.text').textContent === arguments[2])";
    browser
        .wait_for(
            &format!("{who} sees {class} `{text}` by {author}"),
            script,
            json!([class, author, text]),
            WAIT,
        )
        .await
        .map(drop)
}

async fn say(browser: &Browser, text: &str) -> anyhow::Result<()> {
    browser.type_into("#message", text).await?;
    browser.click("#send").await
}

/// Keep a screenshot as a build artefact.
async fn keep_screenshot(browser: &Browser, name: &str) -> anyhow::Result<()> {
    let file = screenshot_path(name);
    browser.screenshot(&file).await?;
    let size = std::fs::metadata(&file)?.len();
    anyhow::ensure!(size > 10_000, "{} is suspiciously small ({size} bytes)", file.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_chat_with_each_other() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = PluginDir::new(&[("chat", None)]);
    let server = TestServer::start(config(&dir)).await;
    let driver = Driver::start().await?;
    let (ada, bob) = (driver.open().await?, driver.open().await?);

    join(&ada, server.addr, "ada", "lobby").await?;
    join(&bob, server.addr, "bob", "lobby").await?;
    wait_members(&ada, "ada", "ada,bob").await?;
    wait_members(&bob, "bob", "ada,bob").await?;
    let joined = "return [...document.querySelectorAll('#log li.system')].some(li => li.textContent.includes('bob joined'))";
    ada.wait_for("ada is told bob joined", joined, json!([]), WAIT).await?;

    say(&bob, "hello ada").await?;
    wait_line(&ada, "ada", "li.say", "bob", "hello ada").await?;
    wait_line(&bob, "bob", "li.say.mine", "bob", "hello ada").await?;
    say(&ada, "hi bob, welcome to Roomcast").await?;
    wait_line(&bob, "bob", "li.say", "ada", "hi bob, welcome to Roomcast").await?;

    // A direct message: choose the member, then write.
    ada.click("#members .member[data-name='bob']").await?;
    ada.wait_for(
        "the direct recipient is shown",
        "return !document.getElementById('to').hidden",
        json!([]),
        WAIT,
    )
    .await?;
    say(&ada, "psst, only you").await?;
    wait_line(&bob, "bob", "li.direct", "ada → you", "psst, only you").await?;
    wait_line(&ada, "ada", "li.direct.mine", "you → bob", "psst, only you").await?;
    ada.click("#to-clear").await?;
    say(&ada, "back to everyone").await?;
    wait_line(&bob, "bob", "li.say", "ada", "back to everyone").await?;
    keep_screenshot(&ada, "demo").await?;

    bob.click("#leave").await?;
    wait_members(&ada, "ada", "ada").await?;
    let left = "return [...document.querySelectorAll('#log li.system')].some(li => li.textContent.includes('bob left'))";
    ada.wait_for("ada is told bob left", left, json!([]), WAIT).await?;

    ada.close().await?;
    bob.close().await?;
    server.stop().await;
    Ok(())
}

/// Install `built` as `name` the way an operator should: copy beside it, then rename.
fn install_atomically(dir: &Path, built: &str, name: &str) {
    let temp = dir.join(format!(".{name}.wasm.tmp"));
    std::fs::copy(built_plugins().join(format!("{built}.wasm")), &temp).unwrap();
    std::fs::rename(&temp, dir.join(format!("{name}.wasm"))).unwrap();
}

async fn wait_css(browser: &Browser, what: &str, css: &str) -> anyhow::Result<Value> {
    browser.wait_for(what, "return document.querySelector(arguments[0]) !== null", json!([css]), WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_swap_shows_on_the_dashboard() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = PluginDir::new(&[("chat", None)]);
    install_atomically(&dir.path, "taga", "tag");
    let server = TestServer::start(config(&dir)).await;
    // Some life to show: two chat members and one member of the swapped plugin's room.
    let mut grace = server.connect("chat:lobby?name=grace").await;
    let mut linus = server.connect("chat:lobby?name=linus").await;
    let _tagged = server.connect("tag").await;
    for text in ["morning", "hi grace"] {
        send_text(&mut grace, &format!("{{\"say\":\"{text}\"}}")).await;
    }

    let driver = Driver::start().await?;
    let browser = driver.open().await?;
    browser.goto(&format!("http://{}/dashboard", server.addr)).await?;
    browser.type_into("#token", "not-the-token").await?;
    browser.click("#sign-in").await?;
    wait_css(&browser, "a wrong token is refused", "p.error[role=alert]").await?;
    browser.type_into("#token", TOKEN).await?;
    browser.click("#sign-in").await?;

    wait_css(&browser, "the dashboard is live", "#live[data-state='connected']").await?;
    wait_css(&browser, "tag v1 is listed", "#plugins tr[data-plugin='tag'][data-version='1']").await?;
    let cookie = browser.eval("return document.cookie", json!([])).await?;
    assert_eq!(cookie, json!(""), "the session cookie is HttpOnly");
    let rooms = "return document.querySelector(\"#rooms tr[data-room='chat:lobby']\")?.textContent ?? ''";
    let row = browser.wait_for("chat:lobby's members", rooms, json!([]), WAIT).await?;
    let row = row.as_str().unwrap_or_default();
    assert!(row.contains("grace") && row.contains("linus") && row.contains("chat (load 1)"), "{row}");
    let connections = "return document.getElementById('connections').textContent === '3'";
    browser.wait_for("three open connections", connections, json!([]), WAIT).await?;

    // Swap the plugin under the live server: the page shows it without a reload (a
    // mark left in the page survives), so it came over the event stream.
    browser.eval("window.roomcastTestMark = 'still the same page'", json!([])).await?;
    install_atomically(&dir.path, "tagb", "tag");
    wait_css(&browser, "tag v2 is listed", "#plugins tr[data-plugin='tag'][data-version='2']").await?;
    wait_css(
        &browser,
        "the reload is logged",
        "#reloads li[data-kind='loaded'][data-plugin='tag'][data-version='2']",
    )
    .await?;
    // A file that does not load is logged as a failure.
    std::fs::write(dir.path.join("broken.wasm"), "not a plugin").unwrap();
    wait_css(&browser, "the failure is logged", "#reloads li[data-kind='failed'][data-plugin='broken']")
        .await?;
    // Messages per second: traffic shows within a push or two.
    for _ in 0..20 {
        send_text(&mut linus, "{\"say\":\"did the tag plugin just change?\"}").await;
    }
    let busy = "return parseFloat(document.getElementById('rate-in').textContent) > 0";
    browser.wait_for("messages per second above zero", busy, json!([]), WAIT).await?;
    browser.resize(1280, 1250).await?;
    keep_screenshot(&browser, "dashboard").await?;

    let mark = browser.eval("return window.roomcastTestMark", json!([])).await?;
    assert_eq!(mark, json!("still the same page"), "the page was not reloaded");

    browser.close().await?;
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_of_a_cluster_node_shows_the_whole_room() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let redis = Redis::start().await;
    let dir = PluginDir::new(&[("chat", None)]);
    let clustered = || Config { redis: Some(redis.url()), ..config(&dir) };
    let one = TestServer::start(clustered()).await;
    let two = TestServer::start(clustered()).await;
    // Ada on node one, Bob and Carol on node two: the dashboard of node one names Ada
    // and counts the others as members elsewhere.
    let mut ada = one.connect("chat:lobby?name=ada").await;
    recv_text(&mut ada).await;
    let _bob = two.connect("chat:lobby?name=bob").await;
    let _carol = two.connect("chat:lobby?name=carol").await;

    let driver = Driver::start().await?;
    let browser = driver.open().await?;
    browser.goto(&format!("http://{}/dashboard", one.addr)).await?;
    browser.type_into("#token", TOKEN).await?;
    browser.click("#sign-in").await?;
    wait_css(&browser, "the dashboard is live", "#live[data-state='connected']").await?;
    let node = "return document.getElementById('node').textContent";
    let node = browser.wait_for("the node's cluster status", node, json!([]), WAIT).await?;
    assert!(node.as_str().is_some_and(|n| n.starts_with("Node ") && n.contains("Redis connected")), "{node}");
    let row = "return (document.querySelector(\"#rooms tr[data-room='chat:lobby']\")?.textContent ?? '')";
    let whole = format!("{row}.includes('2 on other nodes') && {}", &row["return ".len()..]);
    let row = browser.wait_for("the room's members on both nodes", &whole, json!([]), WAIT).await?;
    let row = row.as_str().unwrap_or_default();
    assert!(row.contains("3: ada (#") && !row.contains("bob"), "{row}");
    keep_screenshot(&browser, "dashboard-cluster").await?;

    browser.close().await?;
    one.stop().await;
    two.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reconnects_after_a_server_restart() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = PluginDir::new(&[("chat", None)]);
    let server = TestServer::start(config(&dir)).await;
    let addr = server.addr;
    let driver = Driver::start().await?;
    let ada = driver.open().await?;
    join(&ada, addr, "ada", "restart").await?;

    server.stop().await;
    let lost = "return document.getElementById('status').dataset.state === 'reconnecting'";
    ada.wait_for("the page notices the server went away", lost, json!([]), WAIT).await?;

    // A new server on the same port: the page finds it on its own.
    let server = TestServer::start_on(addr, config(&dir)).await;
    wait_connected(&ada, "ada").await?;
    let mut bob = server.connect("chat:restart?name=bob").await;
    let welcome: Value = serde_json::from_str(&recv_text(&mut bob).await)?;
    assert_eq!(welcome["type"], "welcome");
    assert!(welcome["members"].as_array().is_some_and(|m| m.iter().any(|m| m["name"] == "ada")), "{welcome}");
    wait_members(&ada, "ada", "ada,bob").await?;

    send_text(&mut bob, "{\"say\":\"welcome back\"}").await;
    wait_line(&ada, "ada", "li.say", "bob", "welcome back").await?;
    say(&ada, "glad to be back").await?;
    loop {
        let message: Value = serde_json::from_str(&recv_text(&mut bob).await)?;
        if message["type"] == "say" && message["name"] == "ada" {
            assert_eq!(message["text"], "glad to be back");
            break;
        }
    }

    ada.close().await?;
    server.stop().await;
    Ok(())
}

/// The README's room-protocol snippet, run in Chromium: the browser offers
/// `roomcast.v1`, the host answers with it, and one socket joins two rooms, sends to
/// one and hears the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_room_protocol_snippet_works_in_the_browser() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    const README: &str = include_str!("../../../README.md");
    let section = README.split("## One connection, many rooms").nth(1).expect("the README's section");
    let snippet =
        section.split("```js\n").nth(1).and_then(|rest| rest.split("```").next()).expect("its snippet");
    let dir = PluginDir::new(&[]);
    let server = TestServer::start(config(&dir)).await;
    let mut in_room1 = server.connect("room1").await;
    let mut in_room2 = server.connect("room2").await;
    let driver = Driver::start().await?;
    let page = driver.open().await?;
    page.goto(&format!("http://{}/", server.addr)).await?;
    // The snippet as written, its log kept where the test can read it.
    let script = format!(
        "window.seen = []; const log = console.log; console.log = (value) => {{ window.seen.push(value); log(value); }};\n{snippet}\nwindow.readmeSocket = ws;"
    );
    page.eval(&script, json!([])).await?;
    let joined =
        "return window.seen.filter(m => m.joined).map(m => m.joined).sort().join(',') === 'room1,room2'";
    page.wait_for("both rooms joined", joined, json!([]), WAIT).await?;
    assert_eq!(page.eval("return window.readmeSocket.protocol", json!([])).await?, json!("roomcast.v1"));
    assert_eq!(recv_text(&mut in_room1).await, "hello", "the snippet's send reached room1");
    send_text(&mut in_room2, "from room2").await;
    let heard = "return window.seen.some(m => m.room === 'room2' && m.text === 'from room2')";
    page.wait_for("the page hears room2", heard, json!([]), WAIT).await?;
    page.close().await?;
    server.stop().await;
    Ok(())
}

/// Join one more room on a page already connected.
async fn join_another(browser: &Browser, who: &str, room: &str) -> anyhow::Result<()> {
    browser.type_into("#room", room).await?;
    browser.click("#join").await?;
    let joined = "return document.querySelector(`#rooms .room[data-room='chat:${arguments[0]}']`)?.dataset.state === 'joined'";
    browser.wait_for(&format!("{who} is in chat:{room}"), joined, json!([room]), WAIT).await.map(drop)
}

/// Show room `room` of the page.
async fn open_room(browser: &Browser, room: &str) -> anyhow::Result<()> {
    browser.click(&format!("#rooms .room[data-room='chat:{room}']")).await
}

/// Wait until the room list shows `count` unread messages for `room`.
async fn wait_unread(browser: &Browser, who: &str, room: &str, count: u32) -> anyhow::Result<()> {
    let script = "return (document.querySelector(`#rooms .room[data-room='chat:${arguments[0]}'] .unread`)?.textContent ?? '0') === arguments[1]";
    browser
        .wait_for(
            &format!("{who} has {count} unread in chat:{room}"),
            script,
            json!([room, count.to_string()]),
            WAIT,
        )
        .await
        .map(drop)
}

/// Whether the room shown has a line with this text.
async fn shows_text(browser: &Browser, text: &str) -> anyhow::Result<bool> {
    let script =
        "return [...document.querySelectorAll('#log li .text')].some(t => t.textContent === arguments[0])";
    Ok(browser.eval(script, json!([text])).await? == json!(true))
}

/// Two pages, each in two rooms on one WebSocket: messages land in their own room, and
/// after a server restart each page reconnects and re-joins both rooms by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_in_two_rooms_each_on_one_connection_survive_a_restart() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = PluginDir::new(&[("chat", None)]);
    let server = TestServer::start(config(&dir)).await;
    let addr = server.addr;
    let driver = Driver::start().await?;
    let (ada, bob) = (driver.open().await?, driver.open().await?);
    for (page, who) in [(&ada, "ada"), (&bob, "bob")] {
        join(page, addr, who, "red").await?;
        join_another(page, who, "blue").await?;
    }
    // Two pages, four memberships, two sockets.
    server.wait_metric("roomcast_room_members", 4.0, WAIT).await;
    server.wait_metric("roomcast_connections", 2.0, WAIT).await;
    for (page, who) in [(&ada, "ada"), (&bob, "bob")] {
        wait_members(page, who, "ada,bob").await?;
    }

    // Both pages show blue, the room each joined last. Ada writes in red: Bob's red
    // room counts it, and his blue room does not show it.
    open_room(&ada, "red").await?;
    say(&ada, "in red").await?;
    wait_line(&ada, "ada", "li.say.mine", "ada", "in red").await?;
    wait_unread(&bob, "bob", "red", 1).await?;
    assert!(!shows_text(&bob, "in red").await?, "red's message shown in bob's blue room");
    say(&bob, "in blue").await?;
    wait_unread(&ada, "ada", "blue", 1).await?;
    assert!(!shows_text(&ada, "in blue").await?, "blue's message shown in ada's red room");
    open_room(&bob, "red").await?;
    wait_line(&bob, "bob", "li.say", "ada", "in red").await?;
    wait_unread(&bob, "bob", "red", 0).await?;
    keep_screenshot(&bob, "demo-rooms").await?;

    // A restart: both pages notice, come back on their own and re-join both rooms.
    server.stop().await;
    let lost = "return document.getElementById('status').dataset.state === 'reconnecting'";
    ada.wait_for("ada's page notices the server went away", lost, json!([]), WAIT).await?;
    bob.wait_for("bob's page notices the server went away", lost, json!([]), WAIT).await?;
    let server = TestServer::start_on(addr, config(&dir)).await;
    for (page, who) in [(&ada, "ada"), (&bob, "bob")] {
        wait_connected(page, who).await?;
    }
    server.wait_metric("roomcast_room_members", 4.0, WAIT).await;
    server.wait_metric("roomcast_connections", 2.0, WAIT).await;

    // Messages flow again, each in its room: Ada (on red) and Bob (on red) talk in
    // red, then Ada writes in blue while Bob still shows red.
    say(&ada, "red after the restart").await?;
    wait_line(&bob, "bob", "li.say", "ada", "red after the restart").await?;
    open_room(&ada, "blue").await?;
    wait_line(&ada, "ada", "li.say", "bob", "in blue").await?;
    say(&ada, "blue after the restart").await?;
    wait_unread(&bob, "bob", "blue", 1).await?;
    open_room(&bob, "blue").await?;
    wait_line(&bob, "bob", "li.say", "ada", "blue after the restart").await?;
    assert!(!shows_text(&bob, "red after the restart").await?, "red's message shown in bob's blue room");

    ada.close().await?;
    bob.close().await?;
    server.stop().await;
    Ok(())
}

/// The README's example of the browser client, run in Chromium as a module would run
/// it: it joins two rooms on one socket, sends to one and hears the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_client_example_works_in_the_browser() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    const README: &str = include_str!("../../../README.md");
    const IMPORT: &str = "import { Roomcast } from \"/roomcast.js\";";
    let section = README.split("## One connection, many rooms").nth(1).expect("the README's section");
    let snippet = section
        .split("```js\n")
        .find(|block| block.contains(IMPORT))
        .and_then(|rest| rest.split("```").next())
        .expect("the client's example");
    let dir = PluginDir::new(&[]);
    let server = TestServer::start(config(&dir)).await;
    let mut in_room1 = server.connect("room1").await;
    let mut in_room2 = server.connect("room2").await;
    let driver = Driver::start().await?;
    let page = driver.open().await?;
    page.goto(&format!("http://{}/", server.addr)).await?;
    // The example as written, its static import made dynamic so it can run as a
    // script, its log kept where the test can read it.
    let body = snippet.replace(IMPORT, "const { Roomcast } = await import(\"/roomcast.js\");");
    let script = format!(
        "window.seen = []; const log = console.log; console.log = (...values) => {{ window.seen.push(values.join(' ')); log(...values); }};\n\
         (async () => {{\n{body}\nwindow.readmeClient = rc;\n}})().catch((error) => window.seen.push(`failed: ${{error}}`));"
    );
    page.eval(&script, json!([])).await?;
    let joined = "return window.seen.find(s => s.startsWith('failed')) ?? (window.readmeClient?.rooms.sort().join(',') === 'room1,room2')";
    let state = page.wait_for("both rooms joined", joined, json!([]), WAIT).await?;
    assert_eq!(state, json!(true), "the example failed");
    assert_eq!(recv_text(&mut in_room1).await, "hello", "the example's send reached room1");
    send_text(&mut in_room2, "from room2").await;
    let heard = "return window.seen.includes('room2: from room2')";
    page.wait_for("the page hears room2", heard, json!([]), WAIT).await?;
    server.wait_metric("roomcast_connections", 3.0, WAIT).await;
    page.close().await?;
    server.stop().await;
    Ok(())
}

/// Put the page's network in the test's hands before the page connects: `window.net.drop()`
/// ends the page's newest WebSocket as a network that goes away would (the page's
/// client is not told why, it only sees the socket close), and while
/// `window.net.offline` every new one fails its handshake, as with no network.
const UNRELIABLE_NETWORK: &str = "\
    const Real = window.WebSocket;\
    window.net = { offline: false, sockets: [] };\
    window.net.drop = () => { window.net.offline = true; window.net.sockets.at(-1).close(4000, 'network gone'); };\
    window.WebSocket = class extends Real {\
      constructor(url, protocols) {\
        super(window.net.offline ? url.replace('/ws?', '/offline?') : url, protocols);\
        window.net.sockets.push(this);\
      }\
    };";

/// The say lines of the room shown, in order: `text` or `text (recovered)`.
async fn said(browser: &Browser) -> anyhow::Result<Vec<String>> {
    let script = "return [...document.querySelectorAll('#log li.say')].map(li => \
                  li.querySelector('.text').textContent + (li.classList.contains('recovered') ? ' (recovered)' : ''))";
    Ok(serde_json::from_value(browser.eval(script, json!([])).await?)?)
}

/// Bob's next `say` of the chat plugin (the plugin sends his own back to him).
async fn next_say(bob: &mut Client) -> String {
    loop {
        let message: Value = serde_json::from_str(&recv_text(bob).await).unwrap();
        if message["type"] == "say" {
            return message["text"].as_str().unwrap().to_owned();
        }
    }
}

/// The chat room keeps history: a page whose connection drops is shown, once it is
/// back, what was said meanwhile, in order, marked as recovered, then live messages.
/// When the room cannot give it (the server restarted, a new history), the room says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_lost_its_connection_shows_what_it_missed() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = PluginDir::new(&[("chat", Some("[history]\nsize = 100\n"))]);
    let server = TestServer::start(config(&dir)).await;
    let addr = server.addr;
    let mut bob = server.connect("chat:away?name=bob").await;
    recv_text(&mut bob).await; // the welcome
    let driver = Driver::start().await?;
    let ada = driver.open().await?;
    ada.goto(&format!("http://{addr}/")).await?;
    ada.eval(UNRELIABLE_NETWORK, json!([])).await?;
    ada.type_into("#name", "ada").await?;
    ada.type_into("#room", "away").await?;
    ada.click("#join").await?;
    wait_connected(&ada, "ada").await?;
    wait_members(&ada, "ada", "ada,bob").await?;
    send_text(&mut bob, "{\"say\":\"before\"}").await;
    assert_eq!(next_say(&mut bob).await, "before");
    wait_line(&ada, "ada", "li.say", "bob", "before").await?;

    // The page's network goes; bob talks on.
    ada.eval("window.net.drop()", json!([])).await?;
    let lost = "return document.getElementById('status').dataset.state === 'reconnecting'";
    ada.wait_for("ada's page notices the connection went", lost, json!([]), WAIT).await?;
    server.wait_metric("roomcast_room_members", 1.0, WAIT).await;
    for n in 1..=3 {
        send_text(&mut bob, &format!("{{\"say\":\"missed {n}\"}}")).await;
        assert_eq!(next_say(&mut bob).await, format!("missed {n}"));
    }
    assert_eq!(said(&ada).await?, ["before"]);

    // The network comes back: the page re-joins and shows what it missed, then live.
    ada.eval("window.net.offline = false", json!([])).await?;
    wait_connected(&ada, "ada").await?;
    wait_line(&ada, "ada", "li.say.recovered", "bob", "missed 3").await?;
    send_text(&mut bob, "{\"say\":\"live again\"}").await;
    wait_line(&ada, "ada", "li.say", "bob", "live again").await?;
    assert_eq!(
        said(&ada).await?,
        ["before", "missed 1 (recovered)", "missed 2 (recovered)", "missed 3 (recovered)", "live again"]
    );
    let notice = "return document.querySelectorAll('#log li.notice').length";
    assert_eq!(ada.eval(notice, json!([])).await?, json!(0), "recovered, so no notice");
    wait_members(&ada, "ada", "ada,bob").await?;
    keep_screenshot(&ada, "demo-recovered").await?;

    // A restart starts the room's history afresh: what was said in between is gone,
    // and the room says so.
    server.stop().await;
    ada.wait_for("ada's page notices the server went", lost, json!([]), WAIT).await?;
    let server = TestServer::start_on(addr, config(&dir)).await;
    wait_connected(&ada, "ada").await?;
    let notices = "const told = [...document.querySelectorAll('#log li.notice')]\
                   .map(li => li.querySelector('.text').textContent); return told.length > 0 && told";
    let told = ada.wait_for("ada is told nothing could be recovered", notices, json!([]), WAIT).await?;
    assert_eq!(told, json!(["Messages sent while you were away could not be recovered."]));
    let mut carol = server.connect("chat:away?name=carol").await;
    recv_text(&mut carol).await;
    send_text(&mut carol, "{\"say\":\"new history\"}").await;
    wait_line(&ada, "ada", "li.say", "carol", "new history").await?;
    assert_eq!(said(&ada).await?.last().map(String::as_str), Some("new history"), "not marked recovered");

    ada.close().await?;
    server.stop().await;
    Ok(())
}

/// Keep every WebSocket the page opens in `window.sockets`, so a test can read what it
/// negotiated (`extensions`).
const RECORD_SOCKETS: &str = "\
    const Real = window.WebSocket;\
    window.sockets = [];\
    window.WebSocket = class extends Real {\
      constructor(url, protocols) { super(url, protocols); window.sockets.push(this); }\
    };";

/// With compression on, Chromium negotiates `permessage-deflate` (its own offer, on the
/// demo's connection and on a socket the page opens itself), the demo's messages above
/// the threshold go both ways compressed (a raw member of the same room sees RSV1 on
/// the wire and sends compressed too), and the dashboard works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_compression_on_the_demo_and_the_dashboard_work_compressed() -> anyhow::Result<()> {
    use crate::compression::{ANSWER, answer_of, compressed, deflate, next_frame, upgrade};
    use roomcast::ws::frame::OP_TEXT;
    use tokio::io::AsyncWriteExt as _;

    let _one = ONE_AT_A_TIME.lock().await;
    let dir = PluginDir::new(&[("chat", None)]);
    let server = TestServer::start(Config { compression: true, ..config(&dir) }).await;
    let (mut bob, head) =
        upgrade(server.addr, "/ws/chat:squeeze?name=bob", &["permessage-deflate"], "").await;
    assert_eq!(answer_of(&head), Some(ANSWER));
    // Bob's next `say` from the chat plugin, and whether it came compressed.
    async fn next_say(bob: &mut tokio::net::TcpStream) -> (Value, bool) {
        loop {
            let frame = next_frame(bob).await;
            let message: Value = serde_json::from_slice(&frame.message(15)).unwrap();
            if message["type"] == "say" {
                return (message, frame.rsv1());
            }
        }
    }

    let driver = Driver::start().await?;
    let ada = driver.open().await?;
    ada.goto(&format!("http://{}/", server.addr)).await?;
    ada.eval(RECORD_SOCKETS, json!([])).await?;
    ada.type_into("#name", "ada").await?;
    ada.type_into("#room", "squeeze").await?;
    ada.click("#join").await?;
    wait_connected(&ada, "ada").await?;
    wait_members(&ada, "ada", "ada,bob").await?;
    let extensions = ada.eval("return window.sockets.map(s => s.extensions)", json!([])).await?;
    assert_eq!(extensions, json!([ANSWER]), "the demo's one socket negotiated permessage-deflate");

    // The page's words, over the threshold, reach Bob compressed; and his, sent
    // compressed, show on the page.
    let long = "Compression keeps long chat lines cheap on the wire. ".repeat(12).trim_end().to_owned();
    say(&ada, &long).await?;
    let (said, was_compressed) = next_say(&mut bob).await;
    assert_eq!((said["name"].as_str(), said["text"].as_str()), (Some("ada"), Some(long.as_str())));
    assert!(was_compressed, "a {}-byte line goes compressed", long.len());
    let reply = "And the browser inflates them without a word. ".repeat(10).trim_end().to_owned();
    let body = json!({ "say": reply }).to_string();
    bob.write_all(&compressed(true, OP_TEXT, &deflate(body.as_bytes(), 15))).await?;
    let (own, was_compressed) = next_say(&mut bob).await;
    assert_eq!(
        (own["name"].as_str(), own["text"].as_str(), was_compressed),
        (Some("bob"), Some(reply.as_str()), true)
    );
    wait_line(&ada, "ada", "li.say", "bob", &reply).await?;
    wait_line(&ada, "ada", "li.say.mine", "ada", &long).await?;
    // A short one, under the threshold, still arrives.
    say(&ada, "short").await?;
    assert_eq!(
        next_say(&mut bob).await,
        (json!({"type": "say", "from": said["from"], "name": "ada", "text": "short"}), false)
    );

    // A socket the page opens itself: Chromium's default offer, answered the same.
    let open = "window.probe = new WebSocket(`ws://${location.host}/ws/probe`);";
    ada.eval(open, json!([])).await?;
    let opened = "return window.probe.readyState === 1 && window.probe.extensions";
    let answered = ada.wait_for("the page's own socket opens", opened, json!([]), WAIT).await?;
    assert_eq!(answered, json!(ANSWER));

    // The dashboard, with compression on, as before.
    let board = driver.open().await?;
    board.goto(&format!("http://{}/dashboard", server.addr)).await?;
    board.type_into("#token", TOKEN).await?;
    board.click("#sign-in").await?;
    wait_css(&board, "the dashboard is live", "#live[data-state='connected']").await?;
    let rooms = "return document.querySelector(\"#rooms tr[data-room='chat:squeeze']\")?.textContent ?? ''";
    let row = board.wait_for("chat:squeeze's members", rooms, json!([]), WAIT).await?;
    let row = row.as_str().unwrap_or_default();
    assert!(row.contains("ada") && row.contains("bob"), "{row}");
    let busy = "return parseFloat(document.getElementById('rate-in').textContent) >= 0";
    board.wait_for("the message rate shows", busy, json!([]), WAIT).await?;

    board.close().await?;
    ada.close().await?;
    server.stop().await;
    Ok(())
}
