/*
 * preinit: the first process of a test enclave booted in QEMU's nitro-enclave machine.
 *
 * The Debian guest kernel builds virtio-mmio and vsock as modules, which nitro's `init` does not load. The
 * kernel command line names this program (rdinit=/rootfs/preinit); it loads the modules shipped in the
 * enclave's root file system (/rootfs/ek-modules/, measured like the rest of ramdisk 1), then executes
 * nitro's /init unchanged. A module that fails to load is reported on the console and skipped.
 * Built statically by scripts/qemu-nitro/setup.sh (the root of the initramfs has no C library).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *const modules[] = {
    "virtio_mmio.ko",
    "vsock.ko",
    "vmw_vsock_virtio_transport_common.ko",
    "vmw_vsock_virtio_transport.ko",
};

int main(int argc, char **argv)
{
    char path[256];
    (void)argc;
    for (size_t i = 0; i < sizeof(modules) / sizeof(modules[0]); i++) {
        snprintf(path, sizeof(path), "/rootfs/ek-modules/%s", modules[i]);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            fprintf(stderr, "preinit: %s: %s\n", path, strerror(errno));
            continue;
        }
        if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
            fprintf(stderr, "preinit: loading %s: %s\n", path, strerror(errno));
        close(fd);
    }
    argv[0] = "/init";
    execv("/init", argv);
    fprintf(stderr, "preinit: exec /init: %s\n", strerror(errno));
    return 1;
}
