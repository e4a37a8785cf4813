//! Row-parallel loops with a work threshold, so small tensors do not pay rayon's start-up.

use rayon::prelude::*;

/// Below this many elements of work a loop runs on the calling thread.
pub const PARALLEL_THRESHOLD: usize = 1 << 15;

/// Calls `f(row_index, row)` for each `row_len`-long chunk of `out`, in parallel when `work`
/// (elements touched) is large enough.
pub fn for_each_row<T, F>(out: &mut [T], row_len: usize, work: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    if row_len == 0 {
        return;
    }
    if work < PARALLEL_THRESHOLD {
        out.chunks_mut(row_len).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        out.par_chunks_mut(row_len).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Like [`for_each_row`], with a scratch value made once per worker (`init`) and handed to
/// each call, so rows can reuse a buffer without allocating.
pub fn for_each_row_with<T, S, I, F>(out: &mut [T], row_len: usize, work: usize, init: I, f: F)
where
    T: Send,
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize, &mut [T]) + Sync + Send,
{
    if row_len == 0 {
        return;
    }
    if work < PARALLEL_THRESHOLD {
        let mut scratch = init();
        out.chunks_mut(row_len).enumerate().for_each(|(i, r)| f(&mut scratch, i, r));
    } else {
        out.par_chunks_mut(row_len).enumerate().for_each_init(&init, |s, (i, r)| f(s, i, r));
    }
}
