/* getaddrinfo(3) of one name, each IPv4 address on a line: the resolver a musl-based image
 * (Alpine) uses. musl before 1.2.4 never retries a truncated UDP reply over TCP, so it gets
 * exactly the records the truncated reply carries. */
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    struct addrinfo hints, *res, *p;
    char text[INET_ADDRSTRLEN];
    int rc;

    if (argc != 2) {
        fprintf(stderr, "usage: %s NAME\n", argv[0]);
        return 64;
    }
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(argv[1], NULL, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "getaddrinfo %s: %s\n", argv[1], gai_strerror(rc));
        return 2;
    }
    for (p = res; p != NULL; p = p->ai_next) {
        struct sockaddr_in *sin = (struct sockaddr_in *)p->ai_addr;
        puts(inet_ntop(AF_INET, &sin->sin_addr, text, sizeof text));
    }
    freeaddrinfo(res);
    return 0;
}
