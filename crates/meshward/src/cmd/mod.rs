pub mod ca;
pub mod check;
pub mod control;
pub mod demo_app;
pub mod describe;
pub mod proxy;
pub mod server;
pub mod validate;
