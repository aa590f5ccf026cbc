//! Tests of the Kubernetes source: translation and build on objects shaped as the API server
//! writes them (`fixtures`), and the controller against kube's mock service (`controller`).

mod controller;
mod fake_api;
mod fixtures;
mod translate;
