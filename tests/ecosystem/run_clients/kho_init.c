// SPDX-License-Identifier: GPL-2.0
// What the kernel's KHO selftest init (tools/testing/selftests/kho/init.c) does, with its
// paths as arguments: mount debugfs and proc, finalize KHO (optional), load the next kernel
// with the running one's command line through kexec_file_load, and kexec into it.
// usage: kho_init DEBUGFS_DIR KERNEL [finalize|nofinalize] [fork]
//        kho_init reboot [CMD]    (only reboot(CMD), RB_KEXEC by default; prints the errno)
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kexec.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define COMMAND_LINE_SIZE 2048

static int fail(const char *what)
{
	fprintf(stderr, "kho_init: %s: %s\n", what, strerror(errno));
	return 1;
}

static int go(const char *debugfs, const char *kernel, int finalize)
{
	char path[512], cmdline[COMMAND_LINE_SIZE];
	ssize_t len;
	int fd;

	if (mount("debugfs", debugfs, "debugfs", 0, NULL) < 0)
		return fail("mount debugfs");
	if (mount("proc", "/proc", "proc", 0, NULL) < 0)
		return fail("mount proc");
	if (finalize) {
		const char one[] = "1";
		snprintf(path, sizeof(path), "%s/kho/out/finalize", debugfs);
		fd = open(path, O_RDWR);
		if (fd < 0)
			return fail("open finalize");
		if (write(fd, one, sizeof(one)) != sizeof(one))
			return fail("write finalize");
		close(fd);
	}
	fd = open("/proc/cmdline", O_RDONLY);
	if (fd < 0)
		return fail("open /proc/cmdline");
	len = read(fd, cmdline, sizeof(cmdline) - 1);
	close(fd);
	if (len < 0)
		return fail("read /proc/cmdline");
	cmdline[len] = 0;
	if (len && cmdline[len - 1] == '\n')
		cmdline[--len] = 0;
	fd = open(kernel, O_RDONLY);
	if (fd < 0)
		return fail("open kernel");
	if (syscall(SYS_kexec_file_load, fd, -1, len + 1, cmdline, KEXEC_FILE_NO_INITRAMFS))
		return fail("kexec_file_load");
	reboot(RB_KEXEC);
	return fail("reboot");
}

int main(int argc, char **argv)
{
	int st;
	pid_t pid;

	if (argc >= 2 && !strcmp(argv[1], "reboot")) {
		int cmd = argc > 2 ? (int)strtoul(argv[2], NULL, 0) : RB_KEXEC;

		if (reboot(cmd) < 0)
			printf("reboot: %s\n", strerrorname_np(errno));
		else
			printf("reboot: returned\n");
		return 0;
	}
	if (argc < 4)
		return 2;
	if (argc > 4 && !strcmp(argv[4], "fork")) {
		pid = fork();
		if (pid == 0)
			return go(argv[1], argv[2], !strcmp(argv[3], "finalize"));
		waitpid(pid, &st, 0);
		return 3;       /* only reached if the child came back: no kexec happened */
	}
	return go(argv[1], argv[2], !strcmp(argv[3], "finalize"));
}
