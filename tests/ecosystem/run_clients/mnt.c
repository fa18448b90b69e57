// SPDX-License-Identifier: GPL-2.0
// mount(FSTYPE, TARGET, FSTYPE, 0, NULL): prints OK or the errno's name.
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	if (mount(argv[1], argv[2], argv[1], 0, NULL) < 0)
		printf("%s\n", strerrorname_np(errno));
	else
		printf("OK\n");
	return 0;
}
