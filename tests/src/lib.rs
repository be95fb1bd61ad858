//! Test support: start a server on port 0, connect real clients, build plugins.
