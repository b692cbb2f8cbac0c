//! Helpers shared by the tests that run `cleanroom` processes. Each test
//! file uses some of them (hence the `dead_code` allowance).

#![allow(dead_code)]

/// A free local port (bound once, then released).
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A two-thread runtime for a test that drives nodes and analysts.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
