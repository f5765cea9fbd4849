/* Confines the calling process before it reads untrusted bytes: resource limits, no new
 * privileges, Landlock (no file system access at all, no TCP, no signals or abstract sockets out
 * of the process) and a seccomp filter against the system calls that would reach past it
 * (exec, fork, sockets, ptrace, mounts, kernel keyrings...).
 *
 * Landlock and seccomp filters apply to the calling thread and to threads it creates later, not to
 * threads already running: the process must be single-threaded, which is checked.
 *
 * The Landlock constants are written out here rather than taken from <linux/landlock.h>: they are
 * kernel ABI, and build hosts carry older headers than the kernels the checker runs on. */

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TORCHSCAN_RLIMITS 1
#define TORCHSCAN_NO_NEW_PRIVS 2
#define TORCHSCAN_LANDLOCK 4
#define TORCHSCAN_SECCOMP 8

#define LL_SYS_CREATE_RULESET 444
#define LL_SYS_ADD_RULE 445
#define LL_SYS_RESTRICT_SELF 446
#define LL_CREATE_RULESET_VERSION 1u
#define LL_RULE_PATH_BENEATH 1
#define LL_ACCESS_FS_READ_FILE (1ull << 2)
#define LL_ACCESS_FS_READ_DIR (1ull << 3)
#define LL_ACCESS_FS_WRITE_FILE (1ull << 1)
#define LL_ACCESS_FS_IOCTL_DEV (1ull << 15)

struct ll_ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};

struct ll_path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

struct report {
    char* text;
    size_t size;
    size_t used;
};

static void note(struct report* r, const char* what, int error) {
    if (r->size == 0 || r->used + 1 >= r->size) {
        return;
    }
    int n = snprintf(r->text + r->used, r->size - r->used, "%s%s%s%s", r->used ? "; " : "", what,
                     error ? ": " : "", error ? strerror(error) : "");
    if (n > 0) {
        r->used += (size_t)n < r->size - r->used ? (size_t)n : r->size - r->used - 1;
    }
}

static int threads(void) {
    DIR* dir = opendir("/proc/self/task");
    if (dir == NULL) {
        return -1;
    }
    int count = 0;
    struct dirent* entry;
    while ((entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] != '.') {
            count++;
        }
    }
    closedir(dir);
    return count;
}

/* The address space mapped now, in bytes: the limit is this plus what the check may use, as the
 * process has mapped libtorch (and its CUDA libraries) already. */
static uint64_t mapped_bytes(void) {
    FILE* status = fopen("/proc/self/status", "r");
    if (status == NULL) {
        return 0;
    }
    char line[256];
    unsigned long long kib = 0;
    while (fgets(line, sizeof line, status) != NULL) {
        if (sscanf(line, "VmSize: %llu kB", &kib) == 1) {
            break;
        }
    }
    fclose(status);
    return (uint64_t)kib * 1024;
}

static int limit(int resource, uint64_t soft, uint64_t hard) {
    struct rlimit value = {.rlim_cur = soft, .rlim_max = hard};
    return setrlimit(resource, &value);
}

/* Lets the ruleset read `path` (and, for a folder, everything beneath it), and with `device` also
 * write it and use its ioctls (a GPU's device files). A path that does not exist is skipped: the
 * lists name what libtorch may use where it is present. */
static int allow(int ruleset, const char* path, int device, long abi, struct report* r) {
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0) {
        return errno == ENOENT ? 0 : -1;
    }
    struct stat st;
    struct ll_path_beneath_attr rule = {.allowed_access = LL_ACCESS_FS_READ_FILE, .parent_fd = fd};
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        rule.allowed_access |= LL_ACCESS_FS_READ_DIR;
    }
    if (device) {
        rule.allowed_access |= LL_ACCESS_FS_WRITE_FILE;
        if (abi >= 5) rule.allowed_access |= LL_ACCESS_FS_IOCTL_DEV;
    }
    long done = syscall(LL_SYS_ADD_RULE, ruleset, LL_RULE_PATH_BENEATH, &rule, 0);
    int error = errno;
    close(fd);
    if (done != 0) {
        char text[96];
        snprintf(text, sizeof text, "landlock refused a rule for %.48s", path);
        note(r, text, error);
        return -1;
    }
    return 0;
}

static int landlock(const char* const* readable, size_t readable_count, const char* const* devices, size_t device_count,
                    struct report* r) {
    long abi = syscall(LL_SYS_CREATE_RULESET, NULL, 0, LL_CREATE_RULESET_VERSION);
    if (abi < 1) {
        note(r, "landlock unavailable", errno);
        return 0;
    }
    struct ll_ruleset_attr attr = {0};
    /* Every file system right this kernel knows: with no rule granting any, none is left. */
    attr.handled_access_fs = (1ull << 13) - 1;              /* ABI 1: execute ... make_sym */
    if (abi >= 2) attr.handled_access_fs |= 1ull << 13;     /* refer */
    if (abi >= 3) attr.handled_access_fs |= 1ull << 14;     /* truncate */
    if (abi >= 5) attr.handled_access_fs |= 1ull << 15;     /* ioctl_dev */
    if (abi >= 4) attr.handled_access_net = (1ull << 0) | (1ull << 1); /* bind, connect TCP */
    if (abi >= 6) attr.scoped = (1ull << 0) | (1ull << 1);  /* abstract unix sockets, signals */
    int fd = (int)syscall(LL_SYS_CREATE_RULESET, &attr, sizeof attr, 0);
    if (fd < 0) {
        note(r, "landlock ruleset refused", errno);
        return 0;
    }
    for (size_t i = 0; i < readable_count + device_count; i++) {
        int device = i >= readable_count;
        if (allow(fd, device ? devices[i - readable_count] : readable[i], device, abi, r) != 0) {
            close(fd);
            return 0;
        }
    }
    long done = syscall(LL_SYS_RESTRICT_SELF, fd, 0);
    int error = errno;
    close(fd);
    if (done != 0) {
        note(r, "landlock_restrict_self failed", error);
        return 0;
    }
    char text[48];
    snprintf(text, sizeof text, "landlock ABI %ld", abi);
    note(r, text, 0);
    return 1;
}

#if defined(__x86_64__)
#define NATIVE_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define NATIVE_ARCH AUDIT_ARCH_AARCH64
#endif

#ifdef NATIVE_ARCH
#define MAX_FILTER 256
#define DENY(nr)                                                                   \
    do {                                                                           \
        filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1); \
        filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM); \
    } while (0)

/* `nr` is allowed when its first argument (low 32 bits: a pid_t) is this process's id, or 0 where
 * `zero_is_self`; refused otherwise. */
#define OWN_PID_ONLY(nr, zero_is_self)                                                               \
    do {                                                                                            \
        filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 5);          \
        filter[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])); \
        filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, self, 2, 0);          \
        filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (zero_is_self) ? 0 : self, 1, 0); \
        filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM);   \
        filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);           \
    } while (0)

static int seccomp_filter(struct report* r) {
    struct sock_filter filter[MAX_FILTER];
    uint32_t self = (uint32_t)getpid();
    size_t n = 0;
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, NATIVE_ARCH, 1, 0);
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
#if defined(__x86_64__)
    /* x32 system calls share the architecture but not the numbers. */
    filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, 0, 1);
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
#endif
    /* New processes: threads are made with clone(CLONE_THREAD), once clone3 (whose flags a filter
     * cannot read) says ENOSYS and glibc falls back to clone. */
#ifdef __NR_clone3
    filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 0, 1);
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS);
#endif
    filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 0, 4);
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0]));
    filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_THREAD, 0, 1);
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM);
#ifdef __NR_fork
    DENY(__NR_fork);
#endif
#ifdef __NR_vfork
    DENY(__NR_vfork);
#endif
    /* Calls that act on another process by its id: allowed on this process only (arg0 its pid,
     * or 0 for itself where the call means that), so a worker running as the server's user can
     * neither signal the server (nor its process group, kill(0, ...)) nor change its limits,
     * scheduling or CPUs. */
    OWN_PID_ONLY(__NR_kill, 0);
    OWN_PID_ONLY(__NR_tgkill, 0);
    OWN_PID_ONLY(__NR_rt_sigqueueinfo, 0);
    OWN_PID_ONLY(__NR_rt_tgsigqueueinfo, 0);
    OWN_PID_ONLY(__NR_prlimit64, 1);
    OWN_PID_ONLY(__NR_sched_setaffinity, 1);
    OWN_PID_ONLY(__NR_sched_setscheduler, 1);
    OWN_PID_ONLY(__NR_sched_setparam, 1);
#ifdef __NR_sched_setattr
    OWN_PID_ONLY(__NR_sched_setattr, 1);
#endif
    DENY(__NR_tkill);
    DENY(__NR_setpriority);
    DENY(__NR_ioprio_set);
    DENY(__NR_setpgid);
#ifdef __NR_pidfd_open
    DENY(__NR_pidfd_open);
#endif
#ifdef __NR_pidfd_send_signal
    DENY(__NR_pidfd_send_signal);
#endif
    DENY(__NR_execve);
    DENY(__NR_execveat);
    DENY(__NR_ptrace);
    DENY(__NR_process_vm_readv);
    DENY(__NR_process_vm_writev);
    DENY(__NR_socket);
    DENY(__NR_socketpair);
    DENY(__NR_memfd_create);
    DENY(__NR_mount);
    DENY(__NR_umount2);
    DENY(__NR_pivot_root);
    DENY(__NR_chroot);
    DENY(__NR_unshare);
    DENY(__NR_setns);
    DENY(__NR_bpf);
    DENY(__NR_perf_event_open);
    DENY(__NR_userfaultfd);
    DENY(__NR_keyctl);
    DENY(__NR_add_key);
    DENY(__NR_request_key);
    DENY(__NR_kexec_load);
#ifdef __NR_kexec_file_load
    DENY(__NR_kexec_file_load);
#endif
    DENY(__NR_init_module);
    DENY(__NR_finit_module);
    DENY(__NR_delete_module);
#ifdef __NR_io_uring_setup
    DENY(__NR_io_uring_setup);
#endif
    DENY(__NR_open_by_handle_at);
    DENY(__NR_name_to_handle_at);
    DENY(__NR_personality);
    DENY(__NR_kcmp);
#ifdef __NR_pidfd_getfd
    DENY(__NR_pidfd_getfd);
#endif
#ifdef __NR_process_madvise
    DENY(__NR_process_madvise);
#endif
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);

    struct sock_fprog program = {.len = (unsigned short)n, .filter = filter};
    if (syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &program) != 0) {
        note(r, "seccomp filter refused", errno);
        return 0;
    }
    note(r, "seccomp", 0);
    return 1;
}
#else
static int seccomp_filter(struct report* r) {
    note(r, "seccomp filter not written for this architecture", 0);
    return 0;
}
#endif

/* Returns the layers applied (TORCHSCAN_*), or -1 when the process cannot be confined: it has
 * more than one thread, or resource limits or no_new_privs could not be set. `report` (of
 * `report_size` bytes) says what was applied and what is missing, and why.
 *
 * `cpu_seconds` 0 leaves CPU time unlimited; `file_bytes` UINT64_MAX leaves file sizes alone (0
 * keeps the process from growing any file, shared memory it was handed included). The
 * `readable` paths (files, or folders with everything beneath them) stay readable, and the
 * `devices` readable, writable and open to ioctls. */
int torchscan_confine(uint64_t memory_bytes, uint64_t cpu_seconds, uint64_t file_bytes, const char* const* readable,
                      size_t readable_count, const char* const* devices, size_t device_count, char* report,
                      size_t report_size) {
    struct report r = {.text = report, .size = report_size, .used = 0};
    if (report_size > 0) {
        report[0] = '\0';
    }
    int running = threads();
    if (running != 1) {
        char text[96];
        snprintf(text, sizeof text, "%d threads run already (or /proc/self/task is unreadable); confining needs one",
                 running);
        note(&r, text, 0);
        return -1;
    }
    int layers = 0;
    /* UINT64_MAX: no address-space limit (CUDA reserves far more address space than it uses). */
    uint64_t address_space = memory_bytes == UINT64_MAX ? RLIM_INFINITY : mapped_bytes() + memory_bytes;
    /* The checker sets no RLIMIT_FSIZE: Landlock already keeps files from being opened for writing,
     * and the limit would kill it for writing its answer to a stdout that is a file. */
    int cpu = cpu_seconds == 0 ? 0 : limit(RLIMIT_CPU, cpu_seconds, cpu_seconds + 1);
    int files = file_bytes == UINT64_MAX ? 0 : limit(RLIMIT_FSIZE, file_bytes, file_bytes);
    if (limit(RLIMIT_AS, address_space, address_space) != 0 || cpu != 0 || files != 0 || limit(RLIMIT_CORE, 0, 0) != 0) {
        note(&r, "setrlimit failed", errno);
        return -1;
    }
    layers |= TORCHSCAN_RLIMITS;
    /* Gone with its parent (a server that dies leaves no checker behind), and not attachable. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || prctl(PR_SET_DUMPABLE, 0) != 0 ||
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        note(&r, "prctl failed", errno);
        return -1;
    }
    layers |= TORCHSCAN_NO_NEW_PRIVS;
    if (landlock(readable, readable_count, devices, device_count, &r)) {
        layers |= TORCHSCAN_LANDLOCK;
    }
    if (seccomp_filter(&r)) {
        layers |= TORCHSCAN_SECCOMP;
    }
    return layers;
}
