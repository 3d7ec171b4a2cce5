# Chapter 12: the index scores of the last query over the compressed entries of a CSA layer (m = 4, context
# 1024, a needle planted at token 40), by an aligned indexer and by the layer's random one; the top-8 of each
# marked. Data: 12_compressed_sparse_attention/index_scores.dat,
# "entry first_token aligned aligned_selected random random_selected" (selected: the score, else NaN).
load 'style.gp'

data = datadir.'/12_compressed_sparse_attention/index_scores.dat'
set terminal svg enhanced size 900, 420 font 'sans-serif,12' background rgb 'white'
set output outfile
set multiplot layout 1, 2 title 'CSA index scores of one query over the compressed entries (top-8 marked)' font 'sans-serif,15'
set xlabel 'first token of the entry'
set key top right font ',11'
set title 'aligned indexer (the attention''s own queries)' font 'sans-serif,13'
plot data using 2 : 3 with impulses linetype 1 linewidth 1 title 'score', \
     data using 2 : 4 with points linetype 2 pointsize 1.0 title 'selected'
set title 'the layer''s random indexer' font 'sans-serif,13'
plot data using 2 : 5 with impulses linetype 1 linewidth 1 title 'score', \
     data using 2 : 6 with points linetype 2 pointsize 1.0 title 'selected'
unset multiplot
