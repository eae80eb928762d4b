/*
 * A DPDK application that drives a vhost-user-net backend in loopback mode through DPDK's
 * virtio-user PMD (a frontend Vireo did not write) and checks every frame that comes back.
 *
 * Usage: loopback_check <EAL args> -- <queues> <frames per queue>
 *
 * Each queue sends <frames> frames of lengths 60..1514 (all 12 bytes of MAC addresses, an
 * experimental ethertype, the queue, a sequence number and a pattern derived from both); the
 * backend must return each on the same queue pair, in order, with source and destination MAC
 * swapped and nothing else changed. Prints one RESULT line; exits 0 only if every frame came
 * back intact.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <rte_eal.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>

#define BURST 32
#define RING 256
#define ETHERTYPE 0x88b5

static const uint8_t GUEST[6] = {0x02, 0x00, 0x00, 0x00, 0x00, 0x10};

static uint16_t frame_len(uint64_t seq) { return (uint16_t)(60 + (seq * 37) % (1514 - 60 + 1)); }

static uint8_t pattern(uint16_t q, uint64_t seq, size_t i) { return (uint8_t)(seq * 131 + q * 7 + i); }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    int ret = rte_eal_init(argc, argv);
    if (ret < 0) {
        fprintf(stderr, "EAL init failed\n");
        return 2;
    }
    argc -= ret;
    argv += ret;
    if (argc < 3) {
        fprintf(stderr, "usage: loopback_check <EAL args> -- <queues> <frames per queue>\n");
        return 2;
    }
    uint16_t nq = (uint16_t)atoi(argv[1]);
    uint64_t n = strtoull(argv[2], NULL, 10);
    struct rte_mempool *pool =
        rte_pktmbuf_pool_create("frames", 8191, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE, (int)rte_socket_id());
    if (pool == NULL || rte_eth_dev_count_avail() < 1) {
        fprintf(stderr, "no mbuf pool or no port\n");
        return 2;
    }
    struct rte_eth_conf conf;
    memset(&conf, 0, sizeof(conf));
    if (rte_eth_dev_configure(0, nq, nq, &conf) != 0) {
        fprintf(stderr, "port configuration failed\n");
        return 2;
    }
    for (uint16_t q = 0; q < nq; q++) {
        if (rte_eth_rx_queue_setup(0, q, RING, (unsigned)rte_socket_id(), NULL, pool) != 0 ||
            rte_eth_tx_queue_setup(0, q, RING, (unsigned)rte_socket_id(), NULL) != 0) {
            fprintf(stderr, "queue %u setup failed\n", q);
            return 2;
        }
    }
    if (rte_eth_dev_start(0) != 0) {
        fprintf(stderr, "port start failed\n");
        return 2;
    }
    uint64_t sent[RTE_MAX_QUEUES_PER_PORT] = {0}, got[RTE_MAX_QUEUES_PER_PORT] = {0};
    uint64_t bad = 0, total = 0;
    double deadline = now() + 60.0;
    while (total < n * nq && now() < deadline) {
        for (uint16_t q = 0; q < nq; q++) {
            struct rte_mbuf *m[BURST];
            uint16_t k = 0;
            /* At most a ring's worth in flight: the backend waits (does not drop) when our
             * receive ring is full, and so must we. */
            while (k < BURST && sent[q] + k < n && sent[q] + k - got[q] < RING) {
                uint64_t seq = sent[q] + k;
                uint16_t len = frame_len(seq);
                struct rte_mbuf *b = rte_pktmbuf_alloc(pool);
                if (b == NULL)
                    break;
                uint8_t *p = (uint8_t *)rte_pktmbuf_append(b, len);
                uint8_t src[6] = {0x02, 0x00, 0x00, 0x00, 0x01, (uint8_t)q};
                memcpy(p, GUEST, 6);
                memcpy(p + 6, src, 6);
                p[12] = ETHERTYPE >> 8;
                p[13] = ETHERTYPE & 0xff;
                memcpy(p + 14, &q, 2);
                memcpy(p + 16, &seq, 8);
                for (size_t i = 24; i < len; i++)
                    p[i] = pattern(q, seq, i);
                m[k++] = b;
            }
            uint16_t done = k ? rte_eth_tx_burst(0, q, m, k) : 0;
            for (uint16_t i = done; i < k; i++)
                rte_pktmbuf_free(m[i]);
            sent[q] += done;
            uint16_t r = rte_eth_rx_burst(0, q, m, BURST);
            for (uint16_t i = 0; i < r; i++) {
                const uint8_t *p = rte_pktmbuf_mtod(m[i], const uint8_t *);
                uint64_t seq = got[q];
                uint16_t len = frame_len(seq);
                uint8_t src[6] = {0x02, 0x00, 0x00, 0x00, 0x01, (uint8_t)q};
                int ok = rte_pktmbuf_pkt_len(m[i]) == len && rte_pktmbuf_is_contiguous(m[i]) &&
                         memcmp(p, src, 6) == 0 && memcmp(p + 6, GUEST, 6) == 0 && p[12] == (ETHERTYPE >> 8) &&
                         p[13] == (ETHERTYPE & 0xff);
                uint16_t fq;
                uint64_t fseq;
                if (ok) {
                    memcpy(&fq, p + 14, 2);
                    memcpy(&fseq, p + 16, 8);
                    ok = fq == q && fseq == seq;
                    for (size_t j = 24; ok && j < len; j++)
                        ok = p[j] == pattern(q, seq, j);
                }
                if (!ok && bad < 5)
                    fprintf(stderr, "queue %u: frame %" PRIu64 " came back wrong (length %u)\n", q, seq,
                            rte_pktmbuf_pkt_len(m[i]));
                bad += !ok;
                got[q]++;
                total++;
                rte_pktmbuf_free(m[i]);
            }
        }
    }
    uint64_t all_sent = 0;
    for (uint16_t q = 0; q < nq; q++)
        all_sent += sent[q];
    printf("RESULT queues=%u sent=%" PRIu64 " received=%" PRIu64 " bad=%" PRIu64 "\n", nq, all_sent, total, bad);
    rte_eth_dev_stop(0);
    rte_eth_dev_close(0);
    rte_eal_cleanup();
    return (total == n * nq && all_sent == total && bad == 0) ? 0 : 1;
}
