//! Integration tests: the built binary against a real Azurite, a fault-injecting proxy, local
//! directories and (as root) loop-device filesystems.

mod agent;
mod azure;
mod chaos;
mod cli;
mod consumer;
mod delegation;
mod deploy;
mod disk;
mod dragonfly;
mod faults;
mod image;
mod memory;
mod nodeboot;
mod operator;
mod podns;
mod principals;
mod properties;
mod proxy;
mod resume;
mod signing;
mod space;
mod support;
mod timeline;
mod vm;
