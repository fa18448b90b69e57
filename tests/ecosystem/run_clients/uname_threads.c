// SPDX-License-Identifier: GPL-2.0
// uname(2) from four threads at once (built static and threaded): each prints the release.
#include <pthread.h>
#include <stdio.h>
#include <sys/utsname.h>

static char out[4][65];

static void *ask(void *arg)
{
	struct utsname u;

	if (uname(&u) == 0)
		snprintf(out[(long)arg], sizeof(out[0]), "%s", u.release);
	return NULL;
}

int main(void)
{
	pthread_t t[4];
	long i;

	for (i = 0; i < 4; i++)
		pthread_create(&t[i], NULL, ask, (void *)i);
	for (i = 0; i < 4; i++) {
		pthread_join(t[i], NULL);
		printf("%s\n", out[i]);
	}
	return 0;
}
