/* A minimal polling virtio-vsock driver for thinvm's tiny test guests (device in the first
   virtio-mmio window, guest CID 3): split queues, receive buffers of a header and 4 KiB in one
   descriptor (as newer Linux), transmit as header + payload descriptors (as Linux 6.1), and the
   guest's side of the credit: it advertises GUEST_BUF and counts what it consumed in fwd_cnt;
   peer_* hold the device's credit from its last packet. A host connection request that comes
   while `listening` is 0 is refused with RST, as Linux does. */
#ifndef THINVM_VSOCK_DRIVER_H
#define THINVM_VSOCK_DRIVER_H
#include "guest.h"

#define MMIO 0xd0000000UL
#define R(off) (MMIO + (off))
#define QSZ 16
#define NRX 8
#define BUFSZ (44 + 4096)
#define GUEST_CID 3

struct desc { u64 addr; u32 len; u16 flags; u16 next; } __attribute__((packed));
struct avail { u16 flags, idx, ring[QSZ], used_event; } __attribute__((packed));
struct used_elem { u32 id, len; } __attribute__((packed));
struct used { u16 flags, idx; struct used_elem ring[QSZ]; u16 avail_event; } __attribute__((packed));

struct vq {
    struct desc d[QSZ] __attribute__((aligned(16)));
    struct avail a __attribute__((aligned(2)));
    struct used u __attribute__((aligned(4)));
    u16 last_used;
};

struct hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };

static struct vq rxq __attribute__((aligned(4096)));
static struct vq txq __attribute__((aligned(4096)));
static struct vq evq __attribute__((aligned(4096)));
static u8 rxbuf[NRX][BUFSZ] __attribute__((aligned(4096)));
static struct hdr txhdr;
static u8 txdata[4096];
static u8 evbuf[8][4];

#define F_NEXT 1
#define F_WRITE 2
#define GUEST_BUF (64 * 1024)

/* Credit on the guest's side: what it received and consumed (all of it, at once). */
static u32 fwd_cnt;
/* The device's credit for the connection being served. */
static u32 peer_buf_alloc, peer_fwd_cnt, tx_cnt;

static struct hdr rx_hdr;

static void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

static void setup_queue(int i, struct vq *q, u32 size) {
    mmio_write32(R(0x030), i);
    mmio_write32(R(0x038), size);
    mmio_write32(R(0x080), (u32)(u64)q->d);
    mmio_write32(R(0x084), 0);
    mmio_write32(R(0x090), (u32)(u64)&q->a);
    mmio_write32(R(0x094), 0);
    mmio_write32(R(0x0a0), (u32)(u64)&q->u);
    mmio_write32(R(0x0a4), 0);
    mmio_write32(R(0x044), 1);
}

static void publish(struct vq *q, u16 head, int qi) {
    q->a.ring[q->a.idx % QSZ] = head;
    mb();
    q->a.idx++;
    mb();
    mmio_write32(R(0x050), qi);
}

static int setup(void) {
    if (mmio_read32(R(0x000)) != 0x74726976 || mmio_read32(R(0x008)) != 19) return 0;
    mmio_write32(R(0x070), 0);
    mmio_write32(R(0x070), 1);
    mmio_write32(R(0x070), 1 | 2);
    mmio_write32(R(0x024), 0);
    mmio_write32(R(0x020), 0);
    mmio_write32(R(0x024), 1);
    mmio_write32(R(0x020), 1); /* VERSION_1 */
    mmio_write32(R(0x070), 1 | 2 | 8);
    if (!(mmio_read32(R(0x070)) & 8)) return 0;
    if (mmio_read32(R(0x100)) != GUEST_CID) return 0;
    setup_queue(0, &rxq, QSZ);
    setup_queue(1, &txq, QSZ);
    setup_queue(2, &evq, 8);
    mmio_write32(R(0x070), 1 | 2 | 8 | 4);
    for (u16 i = 0; i < NRX; i++) {
        rxq.d[i] = (struct desc){ (u64)rxbuf[i], BUFSZ, F_WRITE, 0 };
        publish(&rxq, i, 0);
    }
    for (u16 i = 0; i < 8; i++) {
        evq.d[i] = (struct desc){ (u64)evbuf[i], 4, F_WRITE, 0 };
        publish(&evq, i, 2);
    }
    return 1;
}

/* Sends the prepared descriptor chain `head` on the transmit queue; waits for it. */
static void tx_chain(u16 head) {
    u16 want = txq.last_used + 1;
    publish(&txq, head, 1);
    while (*(volatile u16 *)&txq.u.idx != want) __asm__ volatile("pause");
    txq.last_used = want;
}

static void send(u32 src_port, u32 dst_port, u16 op, u32 flags, const u8 *data, u32 len) {
    txhdr = (struct hdr){ GUEST_CID, 2, src_port, dst_port, len, 1, op, flags, GUEST_BUF, fwd_cnt };
    if (len) {
        for (u32 i = 0; i < len; i++) txdata[i] = data[i];
        txq.d[0] = (struct desc){ (u64)&txhdr, 44, F_NEXT, 1 };
        txq.d[1] = (struct desc){ (u64)txdata, len, 0, 0 };
    } else {
        txq.d[0] = (struct desc){ (u64)&txhdr, 44, 0, 0 };
    }
    tx_chain(0);
    if (op == OP_RW) tx_cnt += len;
}

/* The next received packet: copies its header (and returns the payload's buffer). */
static u8 rx_payload[4096];
static u32 rx_len;

static int listening;
static void send(u32 src_port, u32 dst_port, u16 op, u32 flags, const u8 *data, u32 len);

static void recv_one(void);

/* The next packet; a host's connection request that comes before the guest listens is
   refused with RST, as Linux does. */
static void recv(void) {
    for (;;) {
        recv_one();
        if (rx_hdr.op != OP_REQUEST || listening) return;
        send(rx_hdr.dst_port, rx_hdr.src_port, OP_RST, 0, 0, 0);
    }
}

static void recv_one(void) {
    while (*(volatile u16 *)&rxq.u.idx == rxq.last_used) __asm__ volatile("pause");
    struct used_elem e = rxq.u.ring[rxq.last_used % QSZ];
    rxq.last_used++;
    const u8 *b = rxbuf[e.id];
    rx_hdr = *(const struct hdr *)b;
    rx_len = e.len >= 44 ? e.len - 44 : 0;
    if (rx_len > 4096) rx_len = 4096;
    for (u32 i = 0; i < rx_len; i++) rx_payload[i] = b[44 + i];
    /* Credit of the device, from every packet. */
    peer_buf_alloc = rx_hdr.buf_alloc;
    peer_fwd_cnt = rx_hdr.fwd_cnt;
    rxq.d[e.id] = (struct desc){ (u64)rxbuf[e.id], BUFSZ, F_WRITE, 0 };
    publish(&rxq, (u16)e.id, 0);
}


#endif
