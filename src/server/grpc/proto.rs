//! The code tonic and prost generate from `proto/clastor/v1/lock.proto`
//! (`build.rs`): messages, the `Locks` service trait the server implements,
//! and a client (without a transport: bring a `tonic` channel).

#![allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms
)]

tonic::include_proto!("clastor.v1");
