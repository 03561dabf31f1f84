/* thinvm's tiny virtio-blk test guest: a minimal polling virtio-mmio driver (split queue,
   no event index) that exercises every request type against the first disk, checks the
   answers, resets and re-activates the device, and prints one "BLK-CHECK name ok|FAIL" line
   per check before requesting a reset. Requests come in the layouts virtio 1.x allows (a
   header and data in one buffer, data and the status in one, a split header) and through
   indirect tables up to seg_max + 2 descriptors and one beyond.
   `mode=fill` instead writes 64 KiB blocks from MiB 1 on, one line per block, for tests of
   a host file system that fills up.
   `mode=copy-header` instead copies the disk's 256 KiB at MiB 1 (where the host put a qcow2
   image) over its start, as a guest attacking format probing would, and prints
   "BLK-HEADER st0=S st1=S magic=0|1": the statuses of the two 128 KiB writes and whether
   sector 0 now starts with the qcow2 magic. When the first write failed it also checks
   that ordinary and zero writes of sector 0 still work ("BLK-SECTOR0 write=S zeroes=S
   readback=0|1"). */
#include "guest.h"

#define MMIO 0xd0000000UL
#define R(off) (MMIO + (off))
#define QSZ 16

struct desc { u64 addr; u32 len; u16 flags; u16 next; } __attribute__((packed));
struct avail { u16 flags, idx, ring[QSZ], used_event; } __attribute__((packed));
struct used_elem { u32 id, len; } __attribute__((packed));
struct used { u16 flags, idx; struct used_elem ring[QSZ]; u16 avail_event; } __attribute__((packed));

static struct desc descs[QSZ] __attribute__((aligned(16)));
/* An indirect table: header, up to 255 data buffers, status. */
static struct desc itable[257] __attribute__((aligned(16)));
static struct avail avail __attribute__((aligned(2)));
static struct used used __attribute__((aligned(4)));
static u16 last_used;

struct req_hdr { u32 type, reserved; u64 sector; } __attribute__((packed));
struct seg { u64 sector; u32 num; u32 flags; } __attribute__((packed));

static struct req_hdr hdr;
static u8 status;
static u8 buf[65536 * 2] __attribute__((aligned(4096)));
static struct seg segs[2];
static int failures;
static u32 features0;

static void check(const char *name, int ok) {
    puts_serial("BLK-CHECK ");
    puts_serial(name);
    puts_serial(ok ? " ok\n" : " FAIL\n");
    if (!ok) failures++;
}

#define F_NEXT 1
#define F_WRITE 2

static int setup(void) {
    if (mmio_read32(R(0x000)) != 0x74726976 || mmio_read32(R(0x004)) != 2 || mmio_read32(R(0x008)) != 2)
        return 0;
    mmio_write32(R(0x070), 0);
    mmio_write32(R(0x070), 1);
    mmio_write32(R(0x070), 1 | 2);
    mmio_write32(R(0x014), 0);
    u32 f0 = mmio_read32(R(0x010));
    features0 = f0;
    mmio_write32(R(0x014), 1);
    u32 f1 = mmio_read32(R(0x010));
    /* FLUSH(9), BLK_SIZE(6), SEG_MAX(2), DISCARD(13), WRITE_ZEROES(14), INDIRECT_DESC(28);
       VERSION_1 (32). */
    u32 want0 = f0 & ((1u << 9) | (1u << 6) | (1u << 2) | (1u << 13) | (1u << 14) | (1u << 28));
    mmio_write32(R(0x024), 0);
    mmio_write32(R(0x020), want0);
    mmio_write32(R(0x024), 1);
    mmio_write32(R(0x020), f1 & 1);
    mmio_write32(R(0x070), 1 | 2 | 8);
    if (!(mmio_read32(R(0x070)) & 8)) return 0;
    mmio_write32(R(0x030), 0);
    if (mmio_read32(R(0x034)) < QSZ) return 0;
    mmio_write32(R(0x038), QSZ);
    memset_(descs, 0, sizeof(descs));
    memset_(&avail, 0, sizeof(avail));
    memset_(&used, 0, sizeof(used));
    last_used = 0;
    mmio_write32(R(0x080), (u32)(u64)descs);
    mmio_write32(R(0x084), (u32)((u64)descs >> 32));
    mmio_write32(R(0x090), (u32)(u64)&avail);
    mmio_write32(R(0x094), (u32)((u64)&avail >> 32));
    mmio_write32(R(0x0a0), (u32)(u64)&used);
    mmio_write32(R(0x0a4), (u32)((u64)&used >> 32));
    mmio_write32(R(0x044), 1);
    mmio_write32(R(0x070), 1 | 2 | 8 | 4);
    return 1;
}

/* Submits a chain of n descriptors (already filled) and waits for it; returns used len. */
static u32 submit(int n) {
    for (int i = 0; i < n - 1; i++) { descs[i].flags |= F_NEXT; descs[i].next = (u16)(i + 1); }
    avail.ring[avail.idx % QSZ] = 0;
    __asm__ volatile("mfence" ::: "memory");
    avail.idx++;
    __asm__ volatile("mfence" ::: "memory");
    mmio_write32(R(0x050), 0);
    while (*(volatile u16 *)&used.idx == last_used) __asm__ volatile("pause");
    u32 len = used.ring[last_used % QSZ].len;
    last_used++;
    u32 isr = mmio_read32(R(0x060));
    mmio_write32(R(0x064), isr);
    return len;
}

static u8 rw(u32 type, u64 sector, void *data, u32 len) {
    hdr.type = type; hdr.reserved = 0; hdr.sector = sector;
    status = 0xff;
    descs[0] = (struct desc){ (u64)&hdr, 16, 0, 0 };
    int n = 1;
    if (len) { descs[n++] = (struct desc){ (u64)data, len, type == 0 || type == 8 ? F_WRITE : 0, 0 }; }
    descs[n++] = (struct desc){ (u64)&status, 1, F_WRITE, 0 };
    submit(n);
    return status;
}

static int all(const u8 *p, u32 n, u8 v) { for (u32 i = 0; i < n; i++) if (p[i] != v) return 0; return 1; }

/* A read through an indirect table: header, `segs` buffers of 512 bytes (into buf), status.
   Returns the used length. */
static u32 indirect_read(u32 segs) {
    hdr.type = 0; hdr.reserved = 0; hdr.sector = 0;
    status = 0xff;
    itable[0] = (struct desc){ (u64)&hdr, 16, F_NEXT, 1 };
    for (u32 i = 0; i < segs; i++)
        itable[1 + i] = (struct desc){ (u64)buf + 512 * (i % 256), 512, F_NEXT | F_WRITE, (u16)(2 + i) };
    itable[1 + segs] = (struct desc){ (u64)&status, 1, F_WRITE, 0 };
    descs[0] = (struct desc){ (u64)itable, 16 * (segs + 2), 4 /* INDIRECT */, 0 };
    return submit(1);
}

static void fill_mode(void) {
    for (u32 i = 0; i < 64; i++) {
        for (u32 j = 0; j < 65536; j++) buf[j] = (u8)(i + 1);
        u8 st = rw(1, 2048 + 128 * i, buf, 65536);
        puts_serial("BLK-FILL "); put_dec(i); puts_serial(st == 0 ? " ok\n" : " FAIL\n");
    }
    puts_serial("BLK-FILL done\n");
    request_reset();
}

static void copy_header_mode(void) {
    u8 st[2];
    for (u32 i = 0; i < 2; i++) {
        u8 r = rw(0, 2048 + 256 * i, buf, 65536 * 2);
        st[i] = r != 0 ? 0xee : rw(1, 256 * i, buf, 65536 * 2);
    }
    memset_(buf, 0, 512);
    rw(0, 0, buf, 512);
    int magic = buf[0] == 'Q' && buf[1] == 'F' && buf[2] == 'I' && buf[3] == 0xfb;
    puts_serial("BLK-HEADER st0="); put_dec(st[0]);
    puts_serial(" st1="); put_dec(st[1]);
    puts_serial(magic ? " magic=1\n" : " magic=0\n");
    if (st[0] != 0) {
        for (u32 i = 0; i < 4096; i++) buf[i] = 0xab;
        u8 w = rw(1, 0, buf, 4096);
        segs[0] = (struct seg){ 0, 8, 0 };
        u8 z = rw(13, 0, segs, 16);
        for (u32 i = 0; i < 4096; i++) buf[i] = 0x55;
        int back = rw(0, 0, buf, 4096) == 0 && all(buf, 4096, 0);
        puts_serial("BLK-SECTOR0 write="); put_dec(w);
        puts_serial(" zeroes="); put_dec(z);
        puts_serial(back ? " readback=1\n" : " readback=0\n");
    }
    request_reset();
}

void guest_main(const u8 *boot_params) {
    puts_serial("thinvm-blk-guest: start\n");
    check("setup", setup());
    if (has_word(boot_cmdline(boot_params), "mode=fill")) fill_mode();
    if (has_word(boot_cmdline(boot_params), "mode=copy-header")) copy_header_mode();
    u64 cap = mmio_read32(R(0x100)) | ((u64)mmio_read32(R(0x104)) << 32);
    puts_serial("capacity sectors: "); put_dec(cap); puts_serial("\n");
    check("capacity", cap == 16 * 1024 * 1024 / 512);
    u32 align = mmio_read32(R(0x100 + 0x2c));
    check("discard-alignment", align == 128);

    check("get-id", rw(8, 0, buf, 20) == 0 && buf[0] == 'b' && buf[1] == 'l' && buf[2] == 'k');

    if (features0 & (1u << 5)) {
        /* Read-only disk: reads work, every write-type request fails with IOERR. */
        puts_serial("read-only disk\n");
        check("ro-read", rw(0, 0, buf, 4096) == 0);
        check("ro-write-ioerr", rw(1, 0, buf, 4096) == 1);
        segs[0] = (struct seg){ 0, 8, 0 };
        check("ro-discard-ioerr", rw(11, 0, segs, 16) == 1);
        check("ro-flush", rw(4, 0, 0, 0) == 0);
        puts_serial(failures ? "thinvm-blk-guest: FAILED\n" : "thinvm-blk-guest: all checks passed\n");
        request_reset();
    }

    /* Clusters 0..3 (64 KiB each): pattern, then read back. */
    for (u32 i = 0; i < sizeof(buf); i++) buf[i] = 0xab;
    check("write-pattern", rw(1, 0, buf, 65536 * 2) == 0);
    check("write-pattern-2", rw(1, 256, buf, 65536 * 2) == 0);
    memset_(buf, 0, sizeof(buf));
    check("read-back", rw(0, 0, buf, 65536) == 0 && all(buf, 65536, 0xab));

    /* Zero write of a whole cluster (cluster 2): zero detection reclaims it. */
    memset_(buf, 0, 65536);
    check("zero-write", rw(1, 256, buf, 65536) == 0);
    /* Discard cluster 1. */
    segs[0] = (struct seg){ 128, 128, 0 };
    check("discard", rw(11, 0, segs, 16) == 0);
    /* Write-zeroes with unmap on cluster 3. */
    segs[0] = (struct seg){ 384, 128, 1 };
    check("write-zeroes", rw(13, 0, segs, 16) == 0);
    check("flush", rw(4, 0, 0, 0) == 0);
    for (u32 i = 0; i < 65536; i++) buf[i] = 0x55;
    check("read-zeroed", rw(0, 128, buf, 65536 * 2) == 0 && all(buf, 65536 * 2, 0));

    /* Any layout: header and data in one buffer (a write of 4 KiB of 0x3c at MiB 8). */
    for (u32 i = 0; i < 16 + 4096; i++) buf[i] = 0x3c;
    *(struct req_hdr *)buf = (struct req_hdr){ 1, 0, 16384 };
    status = 0xff;
    descs[0] = (struct desc){ (u64)buf, 16 + 4096, 0, 0 };
    descs[1] = (struct desc){ (u64)&status, 1, F_WRITE, 0 };
    submit(2);
    check("layout-header-and-data", status == 0);
    /* Data and status in one buffer: read it back. */
    hdr = (struct req_hdr){ 0, 0, 16384 };
    memset_(buf, 0, 8192);
    buf[4096] = 0xff;
    descs[0] = (struct desc){ (u64)&hdr, 16, 0, 0 };
    descs[1] = (struct desc){ (u64)buf, 4096 + 1, F_WRITE, 0 };
    u32 used_len = submit(2);
    check("layout-data-and-status", buf[4096] == 0 && used_len == 4097 && all(buf, 4096, 0x3c));
    /* A header split in two buffers. */
    memset_(buf, 0, 4096);
    status = 0xff;
    descs[0] = (struct desc){ (u64)&hdr, 6, 0, 0 };
    descs[1] = (struct desc){ (u64)&hdr + 6, 10, 0, 0 };
    descs[2] = (struct desc){ (u64)buf, 4096, F_WRITE, 0 };
    descs[3] = (struct desc){ (u64)&status, 1, F_WRITE, 0 };
    submit(4);
    check("layout-split-header", status == 0 && all(buf, 4096, 0x3c));
    /* Indirect: seg_max (254) data buffers are served, one more is dropped unanswered. */
    u32 seg_max = mmio_read32(R(0x100 + 12));
    check("seg-max", seg_max == 254);
    used_len = indirect_read(seg_max);
    check("indirect-seg-max", status == 0 && used_len == 254 * 512 + 1);
    used_len = indirect_read(seg_max + 1);
    check("indirect-too-long-dropped", status == 0xff && used_len == 0);

    /* Hostile or invalid requests get the right status. */
    check("beyond-capacity", rw(0, cap - 1, buf, 1024) == 1);
    check("unaligned-length", rw(1, 0, buf, 100) == 1);
    check("unknown-type", rw(99, 0, 0, 0) == 2);
    segs[0] = (struct seg){ 0, 8, 2 };
    check("discard-reserved-flags", rw(11, 0, segs, 16) == 2);
    segs[0] = (struct seg){ cap - 4, 8, 0 };
    check("discard-beyond-capacity", rw(11, 0, segs, 16) == 1);
    /* Header claims a read but the buffer is device-readable: IOERR. */
    hdr.type = 0; hdr.sector = 0; status = 0xff;
    descs[0] = (struct desc){ (u64)&hdr, 16, 0, 0 };
    descs[1] = (struct desc){ (u64)buf, 512, 0, 0 };
    descs[2] = (struct desc){ (u64)&status, 1, F_WRITE, 0 };
    submit(3);
    check("wrong-direction", status == 1);
    /* Buffer outside guest RAM (the VM has 256 MiB): IOERR. */
    hdr.type = 0; status = 0xff;
    descs[0] = (struct desc){ (u64)&hdr, 16, 0, 0 };
    descs[1] = (struct desc){ 0x40000000UL, 512, F_WRITE, 0 };
    descs[2] = (struct desc){ (u64)&status, 1, F_WRITE, 0 };
    submit(3);
    check("outside-ram", status == 1);
    /* Missing status descriptor: the chain comes back unanswered (used length 0). */
    hdr.type = 4;
    descs[0] = (struct desc){ (u64)&hdr, 16, 0, 0 };
    check("no-status-dropped", submit(1) == 0);
    /* A descriptor loop: dropped, the device keeps working. */
    descs[0] = (struct desc){ (u64)&hdr, 16, F_NEXT, 1 };
    descs[1] = (struct desc){ (u64)buf, 512, F_NEXT | F_WRITE, 0 };
    avail.ring[avail.idx % QSZ] = 0;
    __asm__ volatile("mfence" ::: "memory");
    avail.idx++;
    mmio_write32(R(0x050), 0);
    while (*(volatile u16 *)&used.idx == last_used) __asm__ volatile("pause");
    last_used++;
    check("loop-dropped", used.ring[(u16)(last_used - 1) % QSZ].len == 0);

    /* Device reset and re-activation: the disk works again. */
    mmio_write32(R(0x070), 0);
    check("reset-status", mmio_read32(R(0x070)) == 0);
    check("re-setup", setup());
    memset_(buf, 0, 65536);
    check("read-after-reset", rw(0, 0, buf, 65536) == 0 && all(buf, 65536, 0xab));

    puts_serial(failures ? "thinvm-blk-guest: FAILED\n" : "thinvm-blk-guest: all checks passed\n");
    request_reset();
}
