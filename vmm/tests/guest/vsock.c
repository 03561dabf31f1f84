/* thinvm's tiny virtio-vsock test guest: a minimal polling driver (split queues, header and
   payload in one receive buffer as newer Linux lays them out, two descriptors on transmit as
   Linux 6.1) with credit-based flow control on its side too. It
   1. connects to host port 5000 (the test listens on PATH_5000), sends "guest-hello", expects
      "host-hello" back;
   2. sends hostile transmit chains (a length beyond the chain, a buffer outside RAM, a
      descriptor loop, a device-writable buffer, a header-only receive buffer) and checks the
      device still answers;
   3. accepts the host's connection to port 1234 and echoes everything it receives, within the
      device's credit, until the host shuts its side down; then closes and checks the RST.
   One "VSOCK-CHECK name ok|FAIL" line per check, then a reset. */
#include "vsock_driver.h"

static int failures;

static void check(const char *name, int ok) {
    puts_serial("VSOCK-CHECK ");
    puts_serial(name);
    puts_serial(ok ? " ok\n" : " FAIL");
    if (!ok) {
        /* What the last packet was. */
        puts_serial(" (last op "); put_dec(rx_hdr.op);
        puts_serial(" ports "); put_dec(rx_hdr.src_port); puts_serial("->"); put_dec(rx_hdr.dst_port);
        puts_serial(" len "); put_dec(rx_hdr.len); puts_serial(")\n");
        failures++;
    }
}

static int eq(const u8 *a, const char *b, u32 n) {
    for (u32 i = 0; i < n; i++) if (a[i] != (u8)b[i]) return 0;
    return b[n] == 0;
}

static void guest_connects(void) {
    fwd_cnt = 0; tx_cnt = 0;
    send(1000, 5000, OP_REQUEST, 0, 0, 0);
    recv();
    check("guest-connect-response", rx_hdr.op == OP_RESPONSE && rx_hdr.src_port == 5000 && rx_hdr.dst_port == 1000);
    check("device-credit", rx_hdr.buf_alloc >= 65536);
    send(1000, 5000, OP_RW, 0, (const u8 *)"guest-hello", 11);
    recv();
    check("host-data", rx_hdr.op == OP_RW && eq(rx_payload, "host-hello", rx_len));
    send(1000, 5000, OP_SHUTDOWN, 3, 0, 0);
    recv();
    check("guest-close-rst", rx_hdr.op == OP_RST);
}

static void hostile(void) {
    /* Length beyond the chain. */
    txhdr = (struct hdr){ GUEST_CID, 2, 1000, 5000, 100, 1, OP_RW, 0, GUEST_BUF, 0 };
    txq.d[0] = (struct desc){ (u64)&txhdr, 44, F_NEXT, 1 };
    txq.d[1] = (struct desc){ (u64)txdata, 10, 0, 0 };
    tx_chain(0);
    /* A buffer outside guest RAM (the VM has 256 MiB). */
    txhdr.len = 10;
    txq.d[1] = (struct desc){ 0x40000000UL, 10, 0, 0 };
    tx_chain(0);
    /* A descriptor loop (parsed as far as the queue size, it would look like a valid data
       packet for the closed connection and draw a RST: it must be dropped instead). */
    txq.d[0] = (struct desc){ (u64)&txhdr, 44, F_NEXT, 1 };
    txq.d[1] = (struct desc){ (u64)txdata, 10, F_NEXT, 0 };
    tx_chain(0);
    /* A device-writable transmit buffer. */
    txq.d[0] = (struct desc){ (u64)&txhdr, 44, F_WRITE, 0 };
    tx_chain(0);
    check("hostile-chains-taken", 1);
    /* The device still answers: a request to a port with no host listener gets RST. */
    fwd_cnt = 0; tx_cnt = 0;
    send(1001, 5999, OP_REQUEST, 0, 0, 0);
    recv();
    check("reset-after-hostile", rx_hdr.op == OP_RST && rx_hdr.dst_port == 1001);
}

/* Serves the host's connection to port 1234: echo until the host shuts down. Received data
   waits in `pend` (the guest's advertised buffer) until the device's credit lets it go back;
   the guest counts it consumed (fwd_cnt) only then. */
static u8 pend[GUEST_BUF];
static u32 pend_len;

static void echo_server(void) {
    fwd_cnt = 0; tx_cnt = 0; pend_len = 0;
    recv();
    check("host-request", rx_hdr.op == OP_REQUEST && rx_hdr.dst_port == 1234);
    u32 hport = rx_hdr.src_port;
    send(1234, hport, OP_RESPONSE, 0, 0, 0);
    u64 echoed = 0;
    u32 credit_waits = 0;
    int ok = 1, within_credit = 1, shut = 0;
    u32 shut_flags = 0;
    while (!shut || pend_len) {
        /* Echo what the device's credit allows. */
        while (pend_len) {
            u32 credit = peer_buf_alloc - (tx_cnt - peer_fwd_cnt);
            u32 n = pend_len < 4096 ? pend_len : 4096;
            if (credit < n) n = credit;
            if (n == 0) { credit_waits++; break; }
            fwd_cnt += n;
            send(1234, hport, OP_RW, 0, pend, n);
            for (u32 i = n; i < pend_len; i++) pend[i - n] = pend[i];
            pend_len -= n;
            echoed += n;
        }
        if (shut && !pend_len) break;
        recv();
        if (rx_hdr.src_port != hport || rx_hdr.dst_port != 1234) { ok = 0; break; }
        if (rx_hdr.op == OP_SHUTDOWN) { shut = 1; shut_flags = rx_hdr.flags; continue; }
        if (rx_hdr.op == OP_CREDIT_UPDATE) continue;
        if (rx_hdr.op != OP_RW) { ok = 0; break; }
        /* The device must never send more than the guest's free buffer. */
        if (pend_len + rx_len > GUEST_BUF) { within_credit = 0; break; }
        for (u32 i = 0; i < rx_len; i++) pend[pend_len + i] = rx_payload[i];
        pend_len += rx_len;
    }
    check("echo-stream", ok);
    check("device-respects-guest-credit", within_credit);
    puts_serial("echoed bytes: "); put_dec(echoed); puts_serial("\n");
    puts_serial("credit waits: "); put_dec(credit_waits); puts_serial("\n");
    check("host-shutdown-send", shut && shut_flags == 2);
    send(1234, hport, OP_SHUTDOWN, 3, 0, 0);
    recv();
    check("close-rst", rx_hdr.op == OP_RST);
}

void guest_main(const u8 *boot_params) {
    (void)boot_params;
    puts_serial("thinvm-vsock-guest: start\n");
    int up = setup();
    check("setup", up);
    if (!up) request_reset();
    guest_connects();
    hostile();
    listening = 1;
    puts_serial("thinvm-vsock-guest: listening on 1234\n");
    echo_server();
    puts_serial(failures ? "thinvm-vsock-guest: FAILED\n" : "thinvm-vsock-guest: all checks passed\n");
    request_reset();
}
