/* open + read to EOF + close, timed per iteration; paths take turns in chunks.
 * usage: reader N CHUNK PATH...   prints "median_ns p90_ns" per path, one line each. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long long now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	long long x = *(const long long *)a, y = *(const long long *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	static char buf[65536];
	int n, chunk, npaths, i, p, k;
	long long **s;

	if (argc < 4)
		return 2;
	n = atoi(argv[1]);
	chunk = atoi(argv[2]);
	npaths = argc - 3;
	s = calloc(npaths, sizeof(*s));
	for (p = 0; p < npaths; p++)
		s[p] = calloc(n, sizeof(**s));
	for (i = 0; i < n; i += chunk)
		for (p = 0; p < npaths; p++)
			for (k = i; k < i + chunk && k < n; k++) {
				long long t0 = now();
				int fd = open(argv[3 + p], O_RDONLY);
				if (fd < 0) {
					perror(argv[3 + p]);
					return 1;
				}
				while (read(fd, buf, sizeof(buf)) > 0)
					;
				close(fd);
				s[p][k] = now() - t0;
			}
	for (p = 0; p < npaths; p++) {
		qsort(s[p], n, sizeof(**s), cmp);
		printf("%lld %lld\n", s[p][n / 2], s[p][n * 9 / 10]);
	}
	return 0;
}
