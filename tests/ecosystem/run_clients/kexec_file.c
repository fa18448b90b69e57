// SPDX-License-Identifier: GPL-2.0
// kexec_file_load(open(KERNEL) or FD, -1, len, CMDLINE, FLAGS): prints OK or the errno's name.
// usage: kexec_file KERNEL|fd:N FLAGS [CMDLINE [LEN]]   (LEN defaults to strlen + 1)
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	const char *cmdline = argc > 3 ? argv[3] : "";
	unsigned long len = argc > 4 ? strtoul(argv[4], NULL, 0) : strlen(cmdline) + 1;
	int fd;

	if (argc < 3)
		return 2;
	if (!strncmp(argv[1], "fd:", 3))
		fd = atoi(argv[1] + 3);
	else if ((fd = open(argv[1], O_RDONLY)) < 0)
		return 2;
	if (syscall(SYS_kexec_file_load, fd, -1, len, cmdline, strtoul(argv[2], NULL, 0)))
		printf("%s\n", strerrorname_np(errno));
	else
		printf("OK\n");
	return 0;
}
