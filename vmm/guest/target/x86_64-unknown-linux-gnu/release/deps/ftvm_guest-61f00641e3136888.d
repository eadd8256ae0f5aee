/work/main/vmm/guest/target/x86_64-unknown-linux-gnu/release/deps/ftvm_guest-61f00641e3136888.d: src/main.rs src/../../src/layout.rs

/work/main/vmm/guest/target/x86_64-unknown-linux-gnu/release/deps/ftvm_guest-61f00641e3136888: src/main.rs src/../../src/layout.rs

src/main.rs:
src/../../src/layout.rs:
