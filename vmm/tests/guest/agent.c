/* thinvm's tiny agent guest: speaks thinvm's agent protocol (docs/agent-protocol.md) on vsock
   port 1025, so `thinvm run --exec` is tested on the host's KVM without Linux. It serves one
   connection: hello, the command, output frames, the exit status. Its "commands":
     echo WORD   stdout "WORD\n", status 0      exit N     status N
     stderr      stderr "oops\n", status 7      big N      N KiB on stdout, status 0
     cat         stdin back to stdout, status 0 hang       never answers
     die         resets the VM without a status anything else: an Error frame */
#include "vsock_driver.h"

#define PORT 1025

static u8 in[GUEST_BUF];
static u32 in_len;
static u32 hport;

/* Takes the next packet for the connection; data goes to `in` (consumed later). */
static void pump(void) {
    recv();
    if (rx_hdr.op == OP_RW && rx_hdr.dst_port == PORT) {
        for (u32 i = 0; i < rx_len && in_len < sizeof(in); i++) in[in_len++] = rx_payload[i];
    }
}

/* Bytes to the host as data packets, within the device's credit. */
static void send_bytes(const u8 *p, u32 n) {
    while (n) {
        u32 credit = peer_buf_alloc - (tx_cnt - peer_fwd_cnt);
        u32 k = n < 4096 ? n : 4096;
        if (credit < k) k = credit;
        if (k == 0) { pump(); continue; }
        send(PORT, hport, OP_RW, 0, p, k);
        p += k;
        n -= k;
    }
}

static void frame(u8 kind, const u8 *payload, u32 len) {
    u8 head[5] = { kind, (u8)len, (u8)(len >> 8), (u8)(len >> 16), (u8)(len >> 24) };
    send_bytes(head, 5);
    if (len) send_bytes(payload, len);
}

/* The next complete frame from the host into (kind, buf, len); consumed bytes count as
   forwarded (fwd_cnt). */
static u8 fbuf[GUEST_BUF];
static u32 flen;
static u8 next_frame(void) {
    for (;;) {
        if (in_len >= 5) {
            u32 len = in[1] | (in[2] << 8) | ((u32)in[3] << 16) | ((u32)in[4] << 24);
            if (len > sizeof(fbuf)) len = sizeof(fbuf);
            if (in_len >= 5 + len) {
                u8 kind = in[0];
                for (u32 i = 0; i < len; i++) fbuf[i] = in[5 + i];
                flen = len;
                for (u32 i = 5 + len; i < in_len; i++) in[i - 5 - len] = in[i];
                in_len -= 5 + len;
                fwd_cnt += 5 + len;
                return kind;
            }
        }
        pump();
    }
}

static int starts(const u8 *p, u32 n, const char *w) {
    u32 i = 0;
    for (; w[i]; i++) if (i >= n || p[i] != (u8)w[i]) return 0;
    return 1;
}

static u32 num(const u8 *p, u32 n) {
    u32 v = 0;
    for (u32 i = 0; i < n && p[i] >= '0' && p[i] <= '9'; i++) v = v * 10 + (p[i] - '0');
    return v;
}

static void exit_status(int code) {
    u8 b[4] = { (u8)code, (u8)(code >> 8), (u8)(code >> 16), (u8)(code >> 24) };
    frame(5, b, 4);
}

static u8 big[4000];

void guest_main(const u8 *boot_params) {
    (void)boot_params;
    puts_serial("thinvm-agent-guest: start\n");
    if (!setup()) { puts_serial("thinvm-agent-guest: no vsock device\n"); request_reset(); }
    listening = 1;
    do { recv(); } while (!(rx_hdr.op == OP_REQUEST && rx_hdr.dst_port == PORT));
    hport = rx_hdr.src_port;
    send(PORT, hport, OP_RESPONSE, 0, 0, 0);
    puts_serial("thinvm-agent-guest: connected\n");
    frame(0, (const u8 *)"thinvm-agent 1", 14);
    if (next_frame() != 1) { puts_serial("thinvm-agent-guest: no command\n"); request_reset(); }
    static u8 cmd[256];
    u32 clen = flen < sizeof(cmd) ? flen : sizeof(cmd);
    for (u32 i = 0; i < clen; i++) cmd[i] = fbuf[i];
    puts_serial("thinvm-agent-guest: command received\n");
    if (starts(cmd, clen, "echo ")) {
        static u8 line[260];
        u32 n = clen - 5;
        for (u32 i = 0; i < n; i++) line[i] = cmd[5 + i];
        line[n] = '\n';
        frame(3, line, n + 1);
        exit_status(0);
    } else if (starts(cmd, clen, "exit ")) {
        exit_status((int)num(cmd + 5, clen - 5));
    } else if (starts(cmd, clen, "stderr")) {
        frame(4, (const u8 *)"oops\n", 5);
        exit_status(7);
    } else if (starts(cmd, clen, "big ")) {
        u32 left = num(cmd + 4, clen - 4) * 1024;
        u32 at = 0;
        while (left) {
            u32 k = left < sizeof(big) ? left : sizeof(big);
            for (u32 i = 0; i < k; i++) big[i] = (u8)('a' + (at + i) % 26);
            frame(3, big, k);
            at += k;
            left -= k;
        }
        exit_status(0);
    } else if (starts(cmd, clen, "cat")) {
        for (;;) {
            u8 kind = next_frame();
            if (kind != 2) continue;
            if (flen == 0) break;
            frame(3, fbuf, flen);
        }
        exit_status(0);
    } else if (starts(cmd, clen, "hang")) {
        puts_serial("thinvm-agent-guest: hanging\n");
        for (;;) __asm__ volatile("pause");
    } else if (starts(cmd, clen, "die")) {
        puts_serial("thinvm-agent-guest: dying\n");
        request_reset();
    } else {
        frame(6, (const u8 *)"unknown command", 15);
    }
    send(PORT, hport, OP_SHUTDOWN, 3, 0, 0);
    puts_serial("thinvm-agent-guest: done\n");
    for (;;) __asm__ volatile("hlt");
}
