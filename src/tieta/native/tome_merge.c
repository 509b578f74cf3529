/* One ToMe merge (optionally with PYRA's re-activation) of a batch, in one call.
 *
 * The same computation as tieta.methods.tome (bipartite_soft_matching + merge_wavg) and
 * tieta.methods.pyra (PyraModulation), for evaluation on the CPU in float32. At batch 1 the
 * merge done as ~25 separate tensor operations costs more than the arithmetic: each one runs
 * right after a block's weights have passed through the caches. Here it is one call.
 *
 * Arithmetic follows the tensor code step for step (x * size, sources added into their
 * destinations in rank order, then one division), so the merged tokens agree with it to
 * float32 rounding; only the similarity scores are summed in a different order.
 *
 * Layout: keys (B, H, N, hd) with any strides; x (B, N, C) and size (B, N) contiguous, size
 * NULL for all ones. Outputs, contiguous: out_x (B, N - r, C), out_size (B, N - r) and
 * out_log_size (B, N - r), the latter for proportional attention. r must be at most
 * (N - prefix) / 2. Returns 0, or -1 when memory runs out.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif
/* helpers are inlined into each clone of the kernel, so they get its instruction set too */
#define ALWAYS_INLINE __attribute__((always_inline))

typedef struct {
    float score;
    int64_t index;
} Ranked;

/* best score first; equal scores keep the lower index first (a stable descending sort) */
static int by_score(const void *left, const void *right) {
    const Ranked *a = left, *b = right;
    if (a->score > b->score) return -1;
    if (a->score < b->score) return 1;
    return (a->index > b->index) - (a->index < b->index);
}

/* best_match[i] = argmax_j <a_i, b_j> (the first on ties), best[i].score its value.
 * a: (num_a, dim) rows; b_t: (dim, padded_b) with zero columns after num_b, padded_b a multiple
 * of LANES. Tiles of ROWS A rows x LANES B columns are summed in registers over the whole dim. */
#define ROWS 4
#define LANES 16
ALWAYS_INLINE static inline void match_rows(const float *a, const float *b_t, int64_t num_a, int64_t num_b,
                                            int64_t padded_b, int64_t dim, Ranked *best, int64_t *best_match) {
    for (int64_t first = 0; first < num_a; first += ROWS) {
        const int64_t rows = num_a - first < ROWS ? num_a - first : ROWS;
        float top[ROWS][LANES];
        int64_t top_index[ROWS][LANES];
        for (int64_t i = 0; i < ROWS; i++)
            for (int64_t l = 0; l < LANES; l++) top[i][l] = -INFINITY, top_index[i][l] = -1;
        /* rows past num_a read row 0 again (any valid memory) and are never reported */
        const float *a0 = a + first * dim, *a1 = a + (rows > 1 ? first + 1 : 0) * dim;
        const float *a2 = a + (rows > 2 ? first + 2 : 0) * dim, *a3 = a + (rows > 3 ? first + 3 : 0) * dim;
        for (int64_t tile = 0; tile < padded_b; tile += LANES) {
            float s0[LANES] = {0.0f}, s1[LANES] = {0.0f}, s2[LANES] = {0.0f}, s3[LANES] = {0.0f};
            for (int64_t d = 0; d < dim; d++) {
                const float *column = b_t + d * padded_b + tile;
                const float w0 = a0[d], w1 = a1[d], w2 = a2[d], w3 = a3[d];
                for (int64_t l = 0; l < LANES; l++) {
                    s0[l] += w0 * column[l];
                    s1[l] += w1 * column[l];
                    s2[l] += w2 * column[l];
                    s3[l] += w3 * column[l];
                }
            }
            const float *sums[ROWS] = {s0, s1, s2, s3};
            for (int64_t i = 0; i < ROWS; i++)
                for (int64_t l = 0; l < LANES; l++)
                    if (tile + l < num_b && (sums[i][l] > top[i][l] || top_index[i][l] < 0))
                        top[i][l] = sums[i][l], top_index[i][l] = tile + l;
        }
        for (int64_t i = 0; i < rows; i++) {
            int64_t arg = top_index[i][0];
            float score = top[i][0];
            for (int64_t l = 1; l < LANES; l++) {
                const int64_t j = top_index[i][l];
                if (j >= 0 && (top[i][l] > score || (top[i][l] == score && j < arg))) score = top[i][l], arg = j;
            }
            best[first + i].score = score;
            best[first + i].index = first + i;
            best_match[first + i] = arg;
        }
    }
}

/* out = row * scale, skipped when scale is 1 (x * 1 == x exactly) */
ALWAYS_INLINE static inline void scaled_copy(float *out, const float *row, float scale, int64_t channels) {
    if (scale == 1.0f) {
        memcpy(out, row, (size_t)channels * sizeof(float));
    } else {
        for (int64_t c = 0; c < channels; c++) out[c] = row[c] * scale;
    }
}

/* sum_i a[i] * b[i] in LANES partial sums (vectorisable; the order differs from a plain loop's) */
ALWAYS_INLINE static inline float dot(const float *a, const float *b, int64_t count) {
    float partial[LANES] = {0.0f};
    int64_t i = 0;
    for (; i + LANES <= count; i += LANES)
        for (int64_t l = 0; l < LANES; l++) partial[l] += a[i + l] * b[i + l];
    float total = 0.0f;
    for (; i < count; i++) total += a[i] * b[i];
    for (int64_t l = 0; l < LANES; l++) total += partial[l];
    return total;
}

ALWAYS_INLINE static inline float sigmoid(float value) { return 1.0f / (1.0f + expf(-value)); }

/* LayerNorm of one row (biased variance), as torch.nn.LayerNorm; centred is scratch. */
ALWAYS_INLINE static inline void layer_norm(const float *row, int64_t channels, const float *weight,
                                            const float *bias, double eps, float *centred, float *out) {
    float partial[LANES] = {0.0f}, total = 0.0f;
    int64_t c = 0;
    for (; c + LANES <= channels; c += LANES)
        for (int64_t l = 0; l < LANES; l++) partial[l] += row[c + l];
    for (; c < channels; c++) total += row[c];
    for (int64_t l = 0; l < LANES; l++) total += partial[l];
    const float mean = total / (float)channels;
    for (c = 0; c < channels; c++) centred[c] = row[c] - mean;
    const float var = dot(centred, centred, channels) / (float)channels;
    const float rstd = 1.0f / sqrtf(var + (float)eps);
    for (c = 0; c < channels; c++) out[c] = centred[c] * rstd * weight[c] + bias[c];
}

/* The metric of one image: keys summed over heads (the spec's mean up to a factor that the
 * cosine ignores), L2-normalised; A tokens as rows of a, B tokens as columns of b_t. */
ALWAYS_INLINE static inline void metric_rows(const float *keys, int64_t heads, int64_t tokens,
                                             int64_t head_dim, int64_t stride_h, int64_t stride_n,
                                             int64_t stride_d, int64_t prefix, int64_t a_start, int64_t b_start,
                                             int64_t padded_b, float *a, float *b_t, float *metric) {
    for (int64_t n = prefix; n < tokens; n++) {
        for (int64_t d = 0; d < head_dim; d++) metric[d] = 0.0f;
        for (int64_t h = 0; h < heads; h++) {
            const float *key = keys + h * stride_h + n * stride_n;
            if (stride_d == 1) {  /* the usual layout: contiguous head dimension, vectorised */
                for (int64_t d = 0; d < head_dim; d++) metric[d] += key[d];
            } else {
                for (int64_t d = 0; d < head_dim; d++) metric[d] += key[d * stride_d];
            }
        }
        const float norm = sqrtf(dot(metric, metric, head_dim));
        if (n >= a_start && (n - a_start) % 2 == 0) {
            float *row = a + ((n - a_start) / 2) * head_dim;
            for (int64_t d = 0; d < head_dim; d++) row[d] = metric[d] / norm;
        } else {
            const int64_t j = (n - b_start) / 2;
            for (int64_t d = 0; d < head_dim; d++) b_t[d * padded_b + j] = metric[d] / norm;
        }
    }
}

/* PYRA's weights for the r sources, from the weighted destinations before any source is added:
 * M_k = LN(src_k + dst_k); token_weight[k] = 2 sigmoid(M_k . W_D) - 1;
 * channel_weight = 2 sigmoid(sum_k W_r[k] M_k). */
ALWAYS_INLINE static inline void pyra_weights(const float *image_x, const float *image_size,
                                              const float *image_out, const Ranked *ranked,
                                              const int64_t *best_match, int64_t r, int64_t channels,
                                              int64_t a_start, int64_t first_b_row, const float *pyra_channel,
                                              const float *pyra_token, const float *norm_weight,
                                              const float *norm_bias, double norm_eps, float *mixed,
                                              float *centred, float *source, float *channel_weight,
                                              float *token_weight) {
    for (int64_t c = 0; c < channels; c++) channel_weight[c] = 0.0f;
    for (int64_t k = 0; k < r; k++) {
        const int64_t in_row = a_start + 2 * ranked[k].index;
        const float *dst = image_out + (first_b_row + best_match[ranked[k].index]) * channels;
        scaled_copy(source, image_x + in_row * channels, image_size ? image_size[in_row] : 1.0f, channels);
        for (int64_t c = 0; c < channels; c++) source[c] = source[c] + dst[c];
        layer_norm(source, channels, norm_weight, norm_bias, norm_eps, centred, mixed);
        const float logit = dot(mixed, pyra_token, channels);
        token_weight[k] = 2.0f * sigmoid(logit) - 1.0f;
        for (int64_t c = 0; c < channels; c++) channel_weight[c] += pyra_channel[k] * mixed[c];
    }
    for (int64_t c = 0; c < channels; c++) channel_weight[c] = 2.0f * sigmoid(channel_weight[c]);
}

VECTOR_CLONES
int64_t tieta_tome_merge(
    const float *keys, int64_t batch, int64_t heads, int64_t tokens, int64_t head_dim,
    int64_t key_stride_b, int64_t key_stride_h, int64_t key_stride_n, int64_t key_stride_d,
    const float *x, int64_t channels, const float *size,
    int64_t r, int64_t prefix,
    const float *pyra_channel, const float *pyra_token, const float *pyra_norm_weight,
    const float *pyra_norm_bias, double pyra_norm_eps,
    float *out_x, float *out_size, float *out_log_size) {
    const int64_t odd_prefix = prefix % 2;
    const int64_t a_start = prefix + odd_prefix, b_start = prefix + 1 - odd_prefix;
    const int64_t num_a = a_start < tokens ? (tokens - a_start + 1) / 2 : 0;
    const int64_t num_b = b_start < tokens ? (tokens - b_start + 1) / 2 : 0;
    const int64_t padded_b = (num_b + LANES - 1) / LANES * LANES;
    const int64_t kept = tokens - r;

    /* one allocation for every scratch buffer */
    const size_t floats = (size_t)(num_a * head_dim + head_dim * padded_b + head_dim + 4 * channels + r);
    const size_t bytes = floats * sizeof(float) + (size_t)num_a * (sizeof(Ranked) + 2 * sizeof(int64_t))
                         + (size_t)tokens * sizeof(int64_t);
    char *scratch = malloc(bytes);
    if (!scratch) return -1;
    Ranked *ranked = (Ranked *)scratch;
    int64_t *best_match = (int64_t *)(ranked + num_a), *merged_away = best_match + num_a;
    int64_t *input_row = merged_away + num_a;
    float *a = (float *)(input_row + tokens), *b_t = a + num_a * head_dim;
    float *metric = b_t + head_dim * padded_b;
    float *mixed = metric + head_dim, *centred = mixed + channels, *source = centred + channels;
    float *channel_weight = source + channels;
    float *token_weight = channel_weight + channels;
    memset(b_t, 0, (size_t)(head_dim * padded_b) * sizeof(float)); /* the padding columns stay 0 */

    for (int64_t image = 0; image < batch; image++) {
        const float *image_x = x + image * tokens * channels;
        const float *image_size = size ? size + image * tokens : NULL;
        float *image_out = out_x + image * kept * channels;
        float *image_sizes = out_size + image * kept, *image_log_sizes = out_log_size + image * kept;
#define SIZE_OF(row) (image_size ? image_size[row] : 1.0f)

        metric_rows(keys + image * key_stride_b, heads, tokens, head_dim, key_stride_h, key_stride_n,
                    key_stride_d, prefix, a_start, b_start, padded_b, a, b_t, metric);
        match_rows(a, b_t, num_a, num_b, padded_b, head_dim, ranked, best_match);
        qsort(ranked, (size_t)num_a, sizeof(Ranked), by_score);

        /* output rows: prefix, unmerged A in original order, then B; input_row maps them back */
        for (int64_t i = 0; i < num_a; i++) merged_away[i] = 0;
        for (int64_t k = 0; k < r; k++) merged_away[ranked[k].index] = 1;
        int64_t out_row = 0;
        for (int64_t p = 0; p < prefix; p++) input_row[out_row++] = p;
        for (int64_t i = 0; i < num_a; i++)
            if (!merged_away[i]) input_row[out_row++] = a_start + 2 * i;
        const int64_t first_b_row = out_row; /* prefix + num_a - r */
        for (int64_t j = 0; j < num_b; j++) input_row[out_row++] = b_start + 2 * j;

        /* every kept token weighted by its size (x * size), and the sizes */
        for (int64_t row = 0; row < kept; row++) {
            const int64_t in_row = input_row[row];
            scaled_copy(image_out + row * channels, image_x + in_row * channels, SIZE_OF(in_row), channels);
            image_sizes[row] = SIZE_OF(in_row);
        }

        if (pyra_channel)
            pyra_weights(image_x, image_size, image_out, ranked, best_match, r, channels, a_start, first_b_row,
                         pyra_channel, pyra_token, pyra_norm_weight, pyra_norm_bias, pyra_norm_eps, mixed,
                         centred, source, channel_weight, token_weight);

        /* sources into their destinations, best match first (the order index_add_ adds them in) */
        for (int64_t k = 0; k < r; k++) {
            const int64_t i = ranked[k].index, in_row = a_start + 2 * i;
            const int64_t row = first_b_row + best_match[i];
            float *dst = image_out + row * channels;
            if (pyra_channel) {
                scaled_copy(source, image_x + in_row * channels, SIZE_OF(in_row), channels);
                const float weight = token_weight[k];
                for (int64_t c = 0; c < channels; c++) dst[c] += source[c] + (source[c] * channel_weight[c]) * weight;
            } else {
                const float *src = image_x + in_row * channels, scale = SIZE_OF(in_row);
                for (int64_t c = 0; c < channels; c++) dst[c] += src[c] * scale;
            }
            image_sizes[row] += SIZE_OF(in_row);
        }
#undef SIZE_OF

        /* size-weighted average (x / 1 == x, so unit sizes are skipped), and log size */
        for (int64_t row = 0; row < kept; row++) {
            const float s = image_sizes[row];
            if (s != 1.0f) {
                float *tokens_row = image_out + row * channels;
                for (int64_t c = 0; c < channels; c++) tokens_row[c] /= s;
            }
            image_log_sizes[row] = logf(s);
        }
    }
    free(scratch);
    return 0;
}
