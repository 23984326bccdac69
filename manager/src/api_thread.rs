//! The API's own thread. The HTTP connections are served by a one-thread runtime of their own, so
//! a status read never waits in the main runtime's run queue behind the supervisor's tasks (a
//! crash storm of 10,000 accounts makes thousands of them ready at once); every other request is
//! handed to the main runtime, where it runs exactly as before.

use std::net::SocketAddr;

use axum::{
    Router,
    extract::Request,
    http::{Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tokio::{net::TcpListener, runtime::Handle};
use tokio_util::sync::CancellationToken;

/// Whether `request` is answered on the API's thread itself: the status reads, which only read
/// the status board. Everything else runs on the main runtime.
fn on_api_thread(request: &Request) -> bool {
    request.method() == Method::GET && request.uri().path().starts_with("/v1/status")
}

/// Middleware: runs `request` on `main` (the daemon's runtime), unless it is a status read.
/// A caller who disconnects no longer cancels the handler (it runs to its end on `main`), which
/// is what the operations' tracked tasks did already.
pub async fn on_main(main: Handle, request: Request, next: Next) -> Response {
    if on_api_thread(&request) {
        return next.run(request).await;
    }
    match main.spawn(next.run(request)).await {
        Ok(response) => response,
        Err(e) => crate::api::ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request's handler failed: {e}"),
        )
        .into_response(),
    }
}

/// Serves `app` on `listener` from a thread of its own until `stop` is cancelled.
///
/// # Cancellation safety
/// Dropping the returned future does not stop the server: cancel `stop`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = listener.into_std()?;
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("chd-api".into())
        .spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| {
                    runtime.block_on(async move {
                        let listener = TcpListener::from_std(listener)?;
                        axum::serve(
                            listener,
                            app.into_make_service_with_connect_info::<SocketAddr>(),
                        )
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await
                    })
                });
            let _ = done.send(served);
        })?;
    finished
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("the API's thread ended early")))
}

#[cfg(test)]
mod tests {
    use std::{sync::mpsc, time::Duration};

    use axum::{
        middleware,
        routing::{get, post},
    };

    use super::*;

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into()
    }

    /// With the main runtime's only thread blocked (as a storm's ready tasks keep it busy), a
    /// status read is still answered; any other request runs on the main runtime once it is free.
    #[test]
    fn a_status_read_is_answered_while_the_main_runtime_is_blocked() {
        let main = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = main.handle().clone();
        let app = Router::new()
            .route("/v1/status/{channel}", get(|| async { "status" }))
            .route("/v1/op", post(|| async { "op" }))
            .layer(middleware::from_fn(move |request, next| {
                on_main(handle.clone(), request, next)
            }));
        let stop = CancellationToken::new();
        let (address_tx, address_rx) = mpsc::channel();
        let (block_tx, block_rx) = tokio::sync::oneshot::channel::<()>();
        let (blocked_tx, blocked_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let server_stop = stop.clone();
        let server = std::thread::spawn(move || {
            main.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                address_tx.send(listener.local_addr().unwrap()).unwrap();
                let served = tokio::spawn(serve(listener, app, server_stop));
                block_rx.await.unwrap();
                blocked_tx.send(()).unwrap();
                // Blocks the runtime's one thread until the test releases it.
                release_rx.recv().unwrap();
                served.await.unwrap()
            })
        });
        let address = address_rx.recv().unwrap();
        let agent = agent();
        let get = |agent: &ureq::Agent| {
            agent
                .get(&format!("http://{address}/v1/status/c"))
                .call()
                .and_then(|mut r| r.body_mut().read_to_string())
        };
        // Up and answering (the first read may race the server's start).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while get(&agent).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the API never answered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }

        block_tx.send(()).unwrap();
        blocked_rx.recv().unwrap();
        // Answered by the API's thread while the main runtime cannot run anything.
        assert_eq!(get(&agent).unwrap(), "status");
        // An operation is handed to the main runtime: answered once it is free.
        let post = std::thread::spawn(move || {
            agent
                .post(&format!("http://{address}/v1/op"))
                .send_empty()
                .and_then(|mut r| r.body_mut().read_to_string())
        });
        release_tx.send(()).unwrap();
        assert_eq!(post.join().unwrap().unwrap(), "op");
        stop.cancel();
        server.join().unwrap().unwrap();
    }
}
