/*
 * ftvm dpdk-sys shim: real (linkable) functions for DPDK's static-inline fast path.
 *
 * DPDK implements rx/tx burst, mbuf alloc/free and friends as `static inline` functions in its
 * headers, so there is no symbol for Rust to call. shim.c wraps each one in an exported
 * function; bindgen reads this header (and the DPDK headers it includes) to generate the Rust
 * declarations, so the C and Rust signatures cannot drift apart.
 *
 * Compiled with the flags `pkg-config --cflags libdpdk` gives, which include
 * `-include rte_config.h`.
 */
#ifndef FTVM_DPDK_SHIM_H
#define FTVM_DPDK_SHIM_H

#include <stdint.h>

#include <rte_alarm.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_ether.h>
#include <rte_interrupts.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

/* ---- errno / lcore ------------------------------------------------------------------------ */

/* The calling thread's rte_errno (a per-lcore thread-local in DPDK). */
int ftvm_rte_errno(void);
/* Sets the calling thread's rte_errno. */
void ftvm_rte_errno_set(int value);
/* rte_lcore_id(): the calling thread's lcore id, or LCORE_ID_ANY for non-EAL threads. */
unsigned int ftvm_rte_lcore_id(void);
/* Sends DPDK's log to stderr instead of its default (stdout + syslog). Call before rte_eal_init. */
int ftvm_log_to_stderr(void);

/* ---- ethdev fast path --------------------------------------------------------------------- */

uint16_t ftvm_rte_eth_rx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **rx_pkts,
                               uint16_t nb_pkts);
uint16_t ftvm_rte_eth_tx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **tx_pkts,
                               uint16_t nb_pkts);

/* ---- mbuf --------------------------------------------------------------------------------- */

struct rte_mbuf *ftvm_rte_pktmbuf_alloc(struct rte_mempool *mp);
int ftvm_rte_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned int count);
void ftvm_rte_pktmbuf_free(struct rte_mbuf *m);
/* rte_pktmbuf_mtod(m, void *): start of the first segment's data. */
void *ftvm_rte_pktmbuf_mtod(struct rte_mbuf *m);
/* Returns the start of the appended area, or NULL if the last segment lacks tailroom. */
char *ftvm_rte_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
/* Returns the new data start, or NULL if the mbuf lacks headroom. */
char *ftvm_rte_pktmbuf_prepend(struct rte_mbuf *m, uint16_t len);
/* Removes len bytes from the end of the last segment: 0 on success, -1 if too short. */
int ftvm_rte_pktmbuf_trim(struct rte_mbuf *m, uint16_t len);
/* Removes len bytes from the start of the first segment: new data start, or NULL. */
char *ftvm_rte_pktmbuf_adj(struct rte_mbuf *m, uint16_t len);
uint16_t ftvm_rte_pktmbuf_data_len(const struct rte_mbuf *m);
uint32_t ftvm_rte_pktmbuf_pkt_len(const struct rte_mbuf *m);
uint16_t ftvm_rte_pktmbuf_nb_segs(const struct rte_mbuf *m);
uint16_t ftvm_rte_pktmbuf_headroom(const struct rte_mbuf *m);
uint16_t ftvm_rte_pktmbuf_tailroom(const struct rte_mbuf *m);
/* The mempool an mbuf belongs to. */
struct rte_mempool *ftvm_rte_pktmbuf_pool(const struct rte_mbuf *m);

#endif /* FTVM_DPDK_SHIM_H */
