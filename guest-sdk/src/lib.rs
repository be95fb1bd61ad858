//! The guest SDK for Roomcast plugins.
