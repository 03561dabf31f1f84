/* thinvm's ACPI test guest: finds the RSDP the way Linux does (boot_params.acpi_rsdp_addr, and
   a scan of the BIOS area 0xe0000..0xfffff), follows RSDP -> XSDT -> each table and FADT ->
   DSDT, and dumps every table in hex on the serial port for the test to check:
     RSDP boot_params=0x... scan=0x...
     TABLE SIG addr=0x... len=N
     HEX 00112233...            (32 bytes per line)
     ACPI-DONE
   Lengths are bounded (a table is at most 64 KiB) and only the identity-mapped first 4 GiB
   are read. Then it resets the VM. */
#include "guest.h"

#define MAX_TABLE 65536u

static u32 rd32(u64 a) { return *(volatile const u32 *)a; }
static u64 rd64(u64 a) { return (u64)rd32(a) | ((u64)rd32(a + 4) << 32); }

static void put_hex_byte(u8 b) {
    const char *d = "0123456789abcdef";
    putc_serial(d[b >> 4]);
    putc_serial(d[b & 0xf]);
}

static void dump(const char *sig, u64 addr, u32 len) {
    puts_serial("TABLE ");
    for (int i = 0; i < 4; i++) putc_serial(sig[i]);
    puts_serial(" addr=");
    put_hex(addr);
    puts_serial(" len=");
    put_dec(len);
    puts_serial("\n");
    for (u32 off = 0; off < len; off += 32) {
        puts_serial("HEX ");
        for (u32 i = off; i < len && i < off + 32; i++) put_hex_byte(mmio_read8(addr + i));
        puts_serial("\n");
    }
}

static int plausible(u64 addr) { return addr != 0 && addr + MAX_TABLE < (1UL << 32); }

/* Dumps the table at addr; returns its length (0 if implausible). */
static u32 dump_table(u64 addr) {
    if (!plausible(addr)) return 0;
    u32 len = rd32(addr + 4);
    if (len < 36 || len > MAX_TABLE) return 0;
    dump((const char *)addr, addr, len);
    return len;
}

static int is_rsdp(u64 a) {
    const char *s = "RSD PTR ";
    for (int i = 0; i < 8; i++)
        if (mmio_read8(a + i) != (u8)s[i]) return 0;
    return 1;
}

void guest_main(const u8 *boot_params) {
    u64 from_params = *(const u64 *)(boot_params + 0x70);
    u64 scanned = 0;
    for (u64 a = 0xe0000; a < 0x100000; a += 16) {
        if (is_rsdp(a)) { scanned = a; break; }
    }
    puts_serial("RSDP boot_params=");
    put_hex(from_params);
    puts_serial(" scan=");
    put_hex(scanned);
    puts_serial("\n");
    if (scanned) {
        dump("RSDP", scanned, 36);
        u64 xsdt = rd64(scanned + 24);
        u32 xlen = dump_table(xsdt);
        for (u32 off = 36; xlen && off + 8 <= xlen; off += 8) {
            u64 t = rd64(xsdt + off);
            u32 len = dump_table(t);
            if (len >= 148 && rd32(t) == 0x50434146 /* "FACP" */)
                dump_table(rd64(t + 140)); /* X_DSDT */
        }
    }
    puts_serial("ACPI-DONE\n");
    request_reset();
}
