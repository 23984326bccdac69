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
