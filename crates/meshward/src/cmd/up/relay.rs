//! A TCP relay from this process's namespace into the lab: `meshward up`
//! runs the control plane on the lab's network, where the proxies reach it
//! at its own address, and the commands an operator runs on the machine
//! (`status`, `apply`, `get`) reach it through this relay on 127.0.0.1.
//! The bytes pass through untouched (TLS end to end). The machine's own
//! namespace never gets a route to the lab: the relay's connections into
//! it are made from sockets created inside the lab's namespace.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;

type Dial = (SocketAddr, mpsc::Sender<std::io::Result<TcpStream>>);

/// Serves 127.0.0.1:`port` (0: any) on this namespace, relaying every
/// connection to `target` in network namespace `netns`, until the process
/// ends. Returns the address it listens on.
pub fn start(netns: &str, target: SocketAddr) -> anyhow::Result<SocketAddr> {
    start_on(SocketAddr::from(([127, 0, 0, 1], 0)), netns, target)
}

/// Like [`start`], listening on `bind` (a published gateway port).
pub fn start_on(bind: SocketAddr, netns: &str, target: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind(bind).with_context(|| format!("a relay on {bind} into the lab"))?;
    let addr = listener.local_addr()?;
    // One thread lives in the lab and makes the relay's connections there.
    let (dial, dials) = mpsc::channel::<Dial>();
    let (entered, ready) = mpsc::channel();
    let netns = netns.to_owned();
    std::thread::Builder::new()
        .name(format!("dial in {netns}"))
        .spawn(move || {
            let result = meshward_netns::enter(&netns);
            let ok = result.is_ok();
            let _ = entered.send(result);
            if ok {
                for (to, reply) in dials {
                    let _ = reply.send(TcpStream::connect_timeout(&to, Duration::from_secs(5)));
                }
            }
        })?;
    ready
        .recv()
        .context("the relay's thread in the lab")?
        .context("the relay's thread in the lab")?;
    std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            for client in listener.incoming().flatten() {
                let (reply, answer) = mpsc::channel();
                if dial.send((target, reply)).is_err() {
                    return;
                }
                if let Ok(Ok(upstream)) = answer.recv() {
                    pipe(client, upstream);
                }
            }
        })?;
    Ok(addr)
}

/// Copies both ways on two threads, passing each end's close on.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let one_way = |mut from: TcpStream, mut to: TcpStream| {
        move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        }
    };
    let _ = std::thread::Builder::new().spawn(one_way(a, b2));
    let _ = std::thread::Builder::new().spawn(one_way(b, a2));
}
