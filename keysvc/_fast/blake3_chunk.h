/* BLAKE3 (unkeyed, 32-byte output) of an input that fits in one chunk (at most 1,024 bytes),
 * written for keysvc from the BLAKE3 specification (Aumasson, Neves, O'Connor, Wilcox-O'Hearn,
 * 2020): sections 2.1-2.5. Every key keysvc issues or imports is far shorter than a chunk, and
 * for those the whole hash is at most 16 compressions of one block, with no tree above them.
 *
 * Why not the blake3 package: its hasher object, update and digest are three Python calls and
 * two allocations, about 0.45 us of a verification's 0.85 us; this is a plain C call.
 * Longer inputs are not handled here: the caller sends them to the package (same function,
 * same digest; tests/test_twins.py holds the two to each other over every length up to two
 * chunks).
 */
#ifndef KEYSVC_BLAKE3_CHUNK_H
#define KEYSVC_BLAKE3_CHUNK_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define KEYSVC_BLAKE3_CHUNK_LEN 1024
#define KEYSVC_BLAKE3_OUT_LEN 32

/* Domain-separation flags (spec, table 3) and the initialisation vector (spec, table 1). */
enum { KB3_CHUNK_START = 1, KB3_CHUNK_END = 2, KB3_ROOT = 8 };

static const uint32_t kb3_iv[8] = {
    0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
    0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u,
};

/* Message word order of each of the 7 rounds: the spec's permutation applied 0..6 times. */
static const uint8_t kb3_schedule[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline uint32_t kb3_rotr(uint32_t w, unsigned c) { return (w >> c) | (w << (32 - c)); }

static inline uint32_t kb3_load_le(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

#define KB3_G(a, b, c, d, x, y)                                   \
    do {                                                          \
        s[a] = s[a] + s[b] + (x); s[d] = kb3_rotr(s[d] ^ s[a], 16); \
        s[c] = s[c] + s[d];       s[b] = kb3_rotr(s[b] ^ s[c], 12); \
        s[a] = s[a] + s[b] + (y); s[d] = kb3_rotr(s[d] ^ s[a], 8);  \
        s[c] = s[c] + s[d];       s[b] = kb3_rotr(s[b] ^ s[c], 7);  \
    } while (0)

/* The compression function for chunk 0 (counter 0), keeping the first half of its output:
 * the next chaining value, or for the ROOT block the hash itself. */
static inline void kb3_compress(uint32_t cv[8], const uint8_t block[64], uint32_t block_len, uint32_t flags) {
    uint32_t m[16], s[16];
    for (int i = 0; i < 16; i++) m[i] = kb3_load_le(block + 4 * i);
    for (int i = 0; i < 8; i++) s[i] = cv[i];
    s[8] = kb3_iv[0]; s[9] = kb3_iv[1]; s[10] = kb3_iv[2]; s[11] = kb3_iv[3];
    s[12] = 0; s[13] = 0; s[14] = block_len; s[15] = flags;
    for (int r = 0; r < 7; r++) {
        const uint8_t *w = kb3_schedule[r];
        KB3_G(0, 4, 8, 12, m[w[0]], m[w[1]]);
        KB3_G(1, 5, 9, 13, m[w[2]], m[w[3]]);
        KB3_G(2, 6, 10, 14, m[w[4]], m[w[5]]);
        KB3_G(3, 7, 11, 15, m[w[6]], m[w[7]]);
        KB3_G(0, 5, 10, 15, m[w[8]], m[w[9]]);
        KB3_G(1, 6, 11, 12, m[w[10]], m[w[11]]);
        KB3_G(2, 7, 8, 13, m[w[12]], m[w[13]]);
        KB3_G(3, 4, 9, 14, m[w[14]], m[w[15]]);
    }
    for (int i = 0; i < 8; i++) cv[i] = s[i] ^ s[i + 8];
}

/* BLAKE3(data[0:len]) into out[32]; returns -1 (nothing written) if len exceeds one chunk. The
 * chunk's blocks are compressed in order, the first flagged CHUNK_START, the last CHUNK_END and
 * ROOT (it is the only chunk); the last block is the partial one, or a full one when len is a
 * multiple of 64, and an empty input is one empty block. */
static inline int keysvc_blake3_chunk(const char *data, size_t len, unsigned char *out) {
    uint32_t cv[8];
    uint8_t block[64];
    uint32_t flags = KB3_CHUNK_START;
    const uint8_t *p = (const uint8_t *)data;
    if (len > KEYSVC_BLAKE3_CHUNK_LEN) return -1;
    memcpy(cv, kb3_iv, sizeof cv);
    while (len > 64) {
        kb3_compress(cv, p, 64, flags);
        flags = 0;
        p += 64;
        len -= 64;
    }
    memset(block, 0, sizeof block);
    if (len) memcpy(block, p, len);
    kb3_compress(cv, block, (uint32_t)len, flags | KB3_CHUNK_END | KB3_ROOT);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)cv[i];
        out[4 * i + 1] = (unsigned char)(cv[i] >> 8);
        out[4 * i + 2] = (unsigned char)(cv[i] >> 16);
        out[4 * i + 3] = (unsigned char)(cv[i] >> 24);
    }
    return 0;
}

#endif
