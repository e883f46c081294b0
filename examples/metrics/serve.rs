//! The smallest scrape endpoint: every connection gets the rendered metrics in Prometheus'
//! text format (any path, any method: this is an example); and the scrape itself. Shared
//! with `tests/metrics.rs`, which scrapes it over HTTP.

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Answers every connection on `listener` with what `metrics` renders, until the task ends.
pub(crate) async fn serve(listener: TcpListener, metrics: PrometheusHandle) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let body = metrics.render();
        tokio::spawn(async move {
            let mut request = [0_u8; 1024];
            let _ = stream.read(&mut request).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

/// `GET /metrics` on `address`, as Prometheus scrapes: the body of a 200 answer.
pub(crate) async fn scrape(address: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other(format!("not a 200 answer: {response}"))),
    }
}
