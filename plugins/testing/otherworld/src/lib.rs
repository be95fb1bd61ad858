//! Otherworld: a test component that does NOT target Roomcast's `room-plugin` world.
//! It imports `roomcast:plugin/room@0.9.0` (a version the host does not provide) and
//! exports only `greet`, so loading it must fail with a clear message naming the
//! mismatch. It uses wit-bindgen directly, as a foreign component would.
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/otherworld.wasm /path/to/plugins-dir/
//! roomcast serve --plugins /path/to/plugins-dir
//! # the host refuses to load otherworld.wasm and logs why; /ws/otherworld has no plugin
//! ```

// Raw wit-bindgen output and its export macro are unsafe code; a foreign component has
// no SDK to hide them behind.
#![allow(unsafe_code)]

mod bindings {
    wit_bindgen::generate!({
        inline: "
            package roomcast:plugin@0.9.0;

            interface room {
                log: func(message: string);
            }

            world other-world {
                import room;
                export greet: func(name: string) -> string;
            }
        ",
    });
}

struct Otherworld;

impl bindings::Guest for Otherworld {
    fn greet(name: String) -> String {
        bindings::roomcast::plugin::room::log(&name);
        format!("hello, {name}")
    }
}

bindings::export!(Otherworld with_types_in bindings);
